"""From a config (experiments/configs/parallelspec.py) to a trained drafter: what
experiments/train_drafter.py and the notebooks call."""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
from absl import logging

from psjax.decoding import autoregressive, common, speculative
from psjax.drafters import parallelspec
from psjax.models.config import ModelConfig
from psjax.models.target import DTYPES, Target, load_target, random_target
from psjax.training import data
from psjax.training import trainer as trainer_lib


def make_target(config) -> tuple[Target, str]:
    if config.target == "random":
        hf = config.target_random_config.to_dict()
        # A larger init makes the random target's choices confident, hence learnable.
        return random_target(ModelConfig.from_hf_dict(hf), seed=config.seed,
                             dtype=config.target_dtype, scale=8.0), "random:" + json.dumps(hf)
    return load_target(config.target, dtype=config.target_dtype), config.target


def distil_random_prompts(target: Target, num: int, prompt_length: int, answer_length: int,
                          seed: int) -> list[dict]:
    """Self-distillation without a dataset: the target answers random token prompts greedily."""
    rng = np.random.default_rng(seed)
    prompts = rng.integers(0, target.config.vocab_size, (num, prompt_length)).tolist()
    out = autoregressive.generate(target.module, target.params, prompts,
                                  max_new_tokens=answer_length)
    return [{"tokens": p + a, "prompt_length": prompt_length}
            for p, a in zip(prompts, out.sequences())]


def make_source(config, target: Target) -> Sequence[dict]:
    if config.data.source == "random_prompts":
        return distil_random_prompts(target, config.data.num_random_prompts,
                                     config.data.random_prompt_length,
                                     config.data.random_answer_length, config.seed)
    from psjax.data import self_distill
    if config.data.source == "jsonl":  # generate_answers' shards, read directly
        # Several directories (comma-separated) mix, e.g. first-turn and multi-turn answers.
        dirs = [d.strip() for d in config.data.jsonl_dir.split(",")]
        missing = [d for d in dirs if not os.path.isdir(d)]
        if missing:
            raise FileNotFoundError(f"data.jsonl_dir: no directory {missing}; write it with "
                                    "experiments/generate_data.py --out_dir")
        return [self_distill.as_arrays(r) for d in dirs for r in self_distill.iter_records(d)]
    if config.data.source == "tfds":  # the SelfDistilled ArrayRecord dataset built from them
        from psjax.data import builders
        builder = builders.SelfDistilled(
            data_dir=config.data.data_dir,
            config=builders.self_distilled_config(config.data.jsonl_dir))
        return builder.as_data_source(split="train")
    raise ValueError(f"data.source must be 'tfds', 'jsonl' or 'random_prompts', got "
                     f"{config.data.source!r}")


def make_evaluator(config, target: Target, drafter: parallelspec.ParallelSpec):
    """tau on held-out prompts through the real engine (greedy chain of k + 1), with the lossless
    check against autoregressive decoding on the same prompts: `eval_divergences` counts the
    outputs that differ at all, which is 0 in float32; in bfloat16 near-ties can part them
    (issue 3), so there it is not a mismatch count (eval_specbench.py makes that one)."""
    if target.tokenizer is not None:
        from psjax.data import spec_bench
        questions = spec_bench.load_questions(config.spec_bench)
        step = max(1, len(questions) // config.eval_prompts)
        prompts = [target.chat_prompt([q["turns"][0]]) for q in questions[::step]]
        prompts = prompts[:config.eval_prompts]
    else:
        rng = np.random.default_rng(config.seed + 1)
        prompts = rng.integers(0, target.config.vocab_size,
                               (config.eval_prompts, config.data.random_prompt_length)).tolist()
    width = common.pad_prompts(prompts)[0].shape[1]  # one compilation for every prompt
    # One cache length for both loops: room for a speculative step's and an autoregressive one's.
    lookahead = max(drafter.cache_lookahead(drafter.config.draft_length),
                    common.step_lookahead(autoregressive.default_step_rows(1, target.config)))
    kw = dict(max_new_tokens=config.eval_max_new_tokens, eos_ids=target.eos_ids,
              prompt_width=width, cache_length=common.default_cache_length(
                  width, config.eval_max_new_tokens, lookahead))
    reference = [autoregressive.generate(target.module, target.params, [p], **kw).sequences()[0]
                 for p in prompts]

    def evaluate(params) -> dict:
        taus, divergences = [], 0
        for prompt, ref in zip(prompts, reference):
            out = speculative.generate(target.module, target.params, [prompt], drafter=drafter,
                                       drafter_params=params, tree=drafter.config.draft_length,
                                       **kw)
            taus.append(out.tau)
            divergences += out.sequences()[0] != ref
        return {"eval_tau": float(np.mean(taus)), "eval_divergences": divergences}

    return evaluate


def train(config, workdir: str, on_metrics=None) -> tuple[trainer_lib.Trainer, list[dict]]:
    target, target_name = make_target(config)
    drafter_config = parallelspec.ParallelSpecConfig(
        target.config, num_masks=config.drafter.num_masks, input_mode=config.drafter.input_mode,
        feature_layers=tuple(config.drafter.feature_layers))
    train_config = trainer_lib.TrainConfig(
        workdir=workdir, batch_size=config.batch_size, max_length=config.max_length,
        total_steps=config.total_steps, learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps, weight_decay=config.weight_decay,
        clip_norm=config.clip_norm, grad_accum=config.grad_accum,
        loss=trainer_lib.LossConfig(**config.loss.to_dict()), seed=config.seed,
        log_every=config.log_every, checkpoint_every=config.checkpoint_every,
        keep_checkpoints=config.keep_checkpoints, init_from=config.init_from,
        mesh=tuple(config.mesh), num_devices=config.num_devices,
        peak_tflops=config.peak_tflops, eval_every=config.eval_every,
        max_nonfinite_steps=config.max_nonfinite_steps)
    trainer = trainer_lib.Trainer(train_config, target, drafter_config, target_name,
                                  compute_dtype=DTYPES[config.compute_dtype])
    source, holdout = data.split_holdout(make_source(config, target), config.data.holdout,
                                         config.batch_size, config.max_length, config.seed)
    logging.info("target %s (%.1fM params), drafter k=%d %s, %d training sequences, %d held out",
                 target_name[:60], target.config.num_params() / 1e6, drafter_config.num_masks,
                 drafter_config.input_mode, len(source), len(holdout) * config.batch_size)
    evaluate = None
    if config.eval_every:
        tau = make_evaluator(config, target, trainer.drafter)
        evaluate = lambda params: {**trainer.holdout_metrics(params, holdout), **tau(params)}
    history = trainer.train(source, evaluate, on_metrics)
    return trainer, history
