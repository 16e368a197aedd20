"""Classifier models: `model.params`, `model.loss(X)` and `model.loss(X, y)`."""
from fastnn.classifiers.cnn import ThreeLayerConvNet
from fastnn.classifiers.conv_net import ConvNet
from fastnn.classifiers.fc_net import FullyConnectedNet, TwoLayerNet

__all__ = ["TwoLayerNet", "FullyConnectedNet", "ThreeLayerConvNet", "ConvNet"]
