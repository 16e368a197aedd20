"""End-to-end benchmarks: training images per second, per workload and contender.

    python -m pytest benchmarks/test_bench_e2e.py
    python -m pytest benchmarks/test_bench_e2e.py -k two_layer
    python -m pytest benchmarks/test_bench_e2e.py -k "convnet and not wide"

Each case builds its trainer, trains one untimed warm-up epoch, then times
one epoch (benchmark.pedantic, one round: an epoch is seconds long; a conv
workload's epoch is its first Workload.num_train training images). The
definitions of images/s and of the share of the sgemm ceiling are in
trainers.py and machine.py; `python benchmarks/report.py` prints the same comparison as a
table. Results go to extra_info: images_per_s, share_of_ceiling, the
versions and the thread counts.
"""
import pytest

import machine
import trainers
from trainers import CONTENDERS
from workloads import WORKLOADS

EPOCHS = 1


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("workload_name", list(WORKLOADS))
def test_train_epoch(benchmark, bench_data, sgemm_rates, environment, workload_name, contender):
    workload = WORKLOADS[workload_name]
    reason = trainers.skip_reason(contender, workload)
    if reason:
        pytest.skip(reason)
    trainer = trainers.make_trainer(contender, workload, bench_data)
    trainer.warm_up()
    trainer.prepare(EPOCHS)
    seconds = []

    def timed_epoch():
        with machine.OtherLoad() as load:
            seconds.append(trainer.timed(EPOCHS))
        benchmark.extra_info["other_cpu_share"] = load.share

    benchmark.group = f"e2e {workload_name}"
    benchmark.pedantic(timed_epoch, rounds=1, iterations=1, warmup_rounds=0)
    res = trainers.result(contender, workload, trainer.images(EPOCHS), seconds, EPOCHS,
                          bench_data.X_train.shape[0])
    benchmark.extra_info.update(
        workload=workload_name, contender=contender, device=res["device"],
        images_per_s=res["images_per_s"], seconds=seconds[0], images=res["images"],
        flops_per_step=res["flops_per_step"], achieved_gflops=res["achieved_gflops"],
        share_of_ceiling=machine.share_of_ceiling(res, sgemm_rates),
        sgemm_gflops=sgemm_rates, data=bench_data.source, environment=environment)


def test_sgemm_ceiling(benchmark, environment):
    """The 4096^3 float32 product through numpy's BLAS, the CPU ceiling's main part."""
    import numpy as np

    n = machine.SGEMM_N
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    c = np.empty_like(a)
    np.matmul(a, b, out=c)  # warm-up
    benchmark.group = "sgemm 4096^3 float32"
    benchmark.pedantic(np.matmul, args=(a, b), kwargs={"out": c}, rounds=5, iterations=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["gflops"] = 2 * n ** 3 / benchmark.stats.stats.median / 1e9
    benchmark.extra_info["environment"] = environment
