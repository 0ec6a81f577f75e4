"""Every metric under 2-process DDP (gloo, CPU) equals the single-process value on the whole set."""

import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flowmo.metrics import ReconstructionMetrics

WORLD_SIZE = 2
NUM_BATCHES = 4  # of 5 images (the paper's evaluation batch)


def evaluation_set():
    """Fixed batches of (original, reconstruction, indices)."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(NUM_BATCHES):
        original = torch.rand(5, 3, 32, 32, generator=generator) * 2 - 1
        reconstruction = (original + 0.2 * torch.randn(original.shape, generator=generator)).clamp(-1, 1)
        indices = torch.randint(0, 16, (5, 6), generator=generator)
        batches.append((original, reconstruction, indices))
    return batches


def build_metrics():
    torch.manual_seed(0)  # the same random LPIPS stand-in on every process
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ReconstructionMetrics(
            lpips_nets=("alex",), lpips_weights="random", fid_feature="random", codebook_bits=4
        )


def evaluate(batches):
    metrics = build_metrics()
    for original, reconstruction, indices in batches:
        metrics.update(reconstruction, original, indices)
    return metrics.compute()


def worker(rank, store_path, results_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD_SIZE)
    try:
        # The authors' split: rank r takes every world-th batch.
        results = evaluate(evaluation_set()[rank::WORLD_SIZE])
        torch.save(results, f"{results_path}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    mp.spawn(worker, args=(str(folder / "store"), str(folder / "results")), nprocs=WORLD_SIZE, join=True)
    return [torch.load(f"{folder / 'results'}.{rank}") for rank in range(WORLD_SIZE)]


def test_ddp_metrics_equal_single_process(ddp_results):
    single = evaluate(evaluation_set())
    one_shard = evaluate(evaluation_set()[0::WORLD_SIZE])
    assert one_shard["psnr"] != pytest.approx(single["psnr"])  # a missing sync would be caught
    assert set(single) >= {"psnr", "psnr_paper", "ssim", "ssim_paper", "lpips_alex", "rfid", "codebook_entropy_bits"}
    for rank_results in ddp_results:
        assert rank_results.keys() == single.keys()
        for name, value in single.items():
            assert rank_results[name] == pytest.approx(value, rel=1e-6, abs=1e-9), name
