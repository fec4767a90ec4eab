"""The launchers' commands, as DRY_RUN=1 prints them (no GPU, TPU or cluster needed)."""

import importlib.metadata
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(script, *args, check=True, **env):
    return subprocess.run(["bash", os.path.join(REPO, "launch", script), *args],
                          env={**os.environ, "DRY_RUN": "1", **env}, capture_output=True,
                          text=True, check=check)


def dry_run(script, *args, **env):
    return launch(script, *args, **env).stdout


def test_gpu_pipeline_train_keeps_named_runs_apart():
    base = dry_run("gpu_pipeline.sh", "train", "qwen05b", "qwen05b", "--config.total_steps=9")
    named = dry_run("gpu_pipeline.sh", "train", "qwen05b", "qwen05b", RUN="dense", OUT="/o")
    assert "--workdir /tmp/work/qwen05b-qwen05b --alsologtostderr --config.total_steps=9" in base
    assert "--workdir /tmp/work/qwen05b-qwen05b-dense" in named
    assert ("cp /tmp/work/qwen05b-qwen05b-dense/metrics.jsonl "
            "/o/train_metrics_qwen05b-qwen05b-dense.jsonl") in named
    assert "--workdir /tmp/work/qwen05b-qwen05b-dense --out /o/drafter_qwen05b_dense" in named
    # the export's draft vocabulary is ranked from the data the drafter trained on
    assert ("draft_vocab.py --data /tmp/distilled/qwen05b --drafter /o/drafter_qwen05b_dense "
            "--out /o/draft_vocab_qwen05b-qwen05b-dense.json") in named
    mixed = dry_run("gpu_pipeline.sh", "train", "qwen05b", "qwen05b",
                    "--config.data.jsonl_dir=/tmp/a,/tmp/b", OUT="/o")
    assert "--config.data.jsonl_dir=/tmp/a,/tmp/b" in mixed
    assert "draft_vocab.py --data /tmp/a,/tmp/b --drafter /o/drafter_qwen05b " in mixed


def test_gpu_pipeline_splits_a_registry_model_into_carriable_pieces():
    out = dry_run("gpu_pipeline.sh", "split", "qwen05", PYTHON="py")
    assert "py -m psjax.convert.registry --model qwen2.5-coder-0.5b-instruct" in out
    assert "split -b 24M -d -a 2" in out and ".up/qwen05.part" in out
    result = launch("gpu_pipeline.sh", "split", "qwen7", check=False)
    assert result.returncode == 2 and "unknown model qwen7" in result.stderr


def test_gpu_pipeline_carries_what_the_gpu_image_lacks():
    """`wheels` fetches, at this venv's versions, each package psjax imports that the GPU
    machine lacks; `setup` there stops, naming `wheels`, when one did not come along."""
    out = dry_run("gpu_pipeline.sh", "wheels", PYTHON=sys.executable)
    assert "--python-version 3.12 --implementation cp" in out
    for package in ("gguf", "ml_collections", "tensorboardX"):
        assert f"-d .whl {package}=={importlib.metadata.version(package)}" in out
    assert "question.jsonl .whl/" in out
    setup = dry_run("gpu_pipeline.sh", "setup")
    assert all(f'python3 -c import {p}' in setup
               for p in ("gguf", "ml_collections", "tensorboardX"))


def test_gpu_pipeline_distills_on_every_gpu():
    out = dry_run("gpu_pipeline.sh", "distill", "qwen05b", "100", GPUS="2", OUT="/o")
    for i in (0, 1):
        assert (f"env CUDA_VISIBLE_DEVICES={i} timeout 0 python3 experiments/generate_data.py "
                f"--target /tmp/models/qwen05b --dtype bfloat16 --num_prompts 100 --num_shards 2 "
                f"--shard_index {i}") in out
        assert f"--out_dir /tmp/distilled/qwen05b.part{i}" in out
    assert "pack /tmp/distilled/qwen05b.part0 /tmp/distilled/qwen05b.part1 /o/distilled_qwen05b" \
        in out
    assert "unpack qwen05b distilled" in out
    # A second answer set (sampled) beside the greedy one: its own directories and pack.
    out = dry_run("gpu_pipeline.sh", "distill", "qwen05b", "100", "--temperature", "0.7",
                  GPUS="1", OUT="/o", KIND="sampled")
    assert "--out_dir /tmp/sampled/qwen05b.part0" in out and "--temperature 0.7" in out
    assert "/o/sampled_qwen05b" in out and "unpack qwen05b sampled" in out


def test_gpu_pipeline_benchmarks_the_train_step():
    out = dry_run("gpu_pipeline.sh", "bench_train", "--num_masks", "1,3", OUT="/o")
    assert ("python3 experiments/bench_train.py --shape qwen2.5-0.5b --out /o/bench_train.json "
            "--num_masks 1,3") in out


def test_gpu_pipeline_evaluates_a_drafter_with_its_fitted_tree():
    out = dry_run("gpu_pipeline.sh", "evaluate", "smollm2", "/k/drafter", "k3", "--warmup", "2",
                  OUT="/o", TREE_NODES="32")
    assert ("python3 experiments/design_tree.py --target /tmp/models/smollm2 "
            "--questions /tmp/spec_bench.jsonl --per_category 2") in out
    assert "--drafter /k/drafter --out /o/eval_k3/tree.json" in out
    assert ("--methods ar,pld,parallelspec_k2,parallelspec_tree,hf_static_compiled "
            "--ps_tree /o/eval_k3/tree.json:32 --out_dir /o/eval_k3 --warmup 2") in out
    assert out.index("design_tree.py") < out.index("eval_specbench.py")
    assert "lookup" not in out


def test_gpu_pipeline_evaluates_prompt_lookup_in_front():
    out = dry_run("gpu_pipeline.sh", "evaluate", "qwen05b", "/k/d", "x", OUT="/o",
                  LOOKUP_DEPTH="8", LOOKUP_NODES="32", METHODS="ar,parallelspec_tree")
    assert "--drafter /k/d --lookup_depth 8 --out /o/eval_x/tree_lookup.json" in out
    assert ("--methods ar,parallelspec_tree,parallelspec_lookup --ps_tree /o/eval_x/tree.json:16 "
            "--ps_lookup_tree /o/eval_x/tree_lookup.json:32 --out_dir /o/eval_x") in out


def test_gpu_pipeline_names_an_unknown_stage():
    result = launch("gpu_pipeline.sh", "trian", check=False)
    assert result.returncode == 2 and "unknown stage trian" in result.stderr


def test_multi_gpu_spreads_the_mesh_over_the_gpus():
    out = dry_run("multi_gpu.sh", "smollm2", "/w", "--config.batch_size=64", NGPU="4")
    assert "CUDA_VISIBLE_DEVICES=0,1,2,3" in out
    assert "--config.mesh=(1,4,1) --config.num_devices=4 --workdir /w" in out
    assert out.rstrip().endswith("--config.batch_size=64")


def test_tpu_pod_runs_one_distributed_command_on_every_worker():
    out = dry_run("tpu_pod.sh", "smollm2", "gs://b/w", TPU_NAME="pod", ZONE="z")
    assert "gcloud compute tpus tpu-vm ssh pod --zone=z --worker=all" in out
    assert "train_drafter.py --distributed" in out


def test_slurm_runs_one_process_a_node_owning_its_gpus():
    out = dry_run("slurm.sbatch", "smollm2", "/s", SLURM_JOB_NUM_NODES="2", GPUS_PER_NODE="8")
    assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in out
    assert "srun --nodes=2 --ntasks-per-node=1" in out
    assert "--distributed --config experiments/configs/parallelspec.py:smollm2 " \
           "--config.mesh=(2,-1,1) --workdir /s" in out


@pytest.mark.parametrize("script", ["multi_gpu.sh", "tpu_pod.sh"])
def test_launchers_name_their_usage(script):
    result = launch(script, check=False)
    assert result.returncode != 0 and f"usage: launch/{script}" in result.stderr
