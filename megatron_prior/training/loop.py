"""The training loop, top to bottom: set up, (resume), iterate, evaluate, log, save, summarise.

Built on megatron-core's pieces: parallel_state (via megatron_prior.parallel), DDP, the
Megatron optimizer and its LR/WD scheduler, the pipeline schedules, finalize_model_grads and
dist_checkpointing (via megatron_prior.training.checkpointing). The loss is per token
(``calculate_per_token_loss``): gradients are divided by the global number of loss tokens,
so results do not depend on micro-batching or the data-parallel size.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.module import Float16Module

from megatron_prior import parallel
from megatron_prior.models.arch import get_arch
from megatron_prior.models.builder import build_model
from megatron_prior.models.config import ModelConfig
from megatron_prior.models.init import initialize_weights
from megatron_prior.models.language_model import load_language_model
from megatron_prior.models.vision_encoder import load_vision_encoder
from megatron_prior.training import checkpointing
from megatron_prior.training.data import TrainingData, build_training_data
from megatron_prior.training.metrics import MetricsLogger, PositionCounts, flops_per_iteration, reduce_logs
from megatron_prior.training.signals import EarlyExit
from megatron_prior.training.steps import make_forward_step

log = logging.getLogger("megatron_prior.train")


def model_config_from_args(args: argparse.Namespace, tokenizer) -> ModelConfig:
    """The model the flags describe; its image size and rule are the ones the batches are read at
    (``--image-size``/``--image-aspect``, resolved from the image stores by ``validate_args``)."""
    image = get_arch(args.model).needs_images
    return ModelConfig(
        arch=args.model,
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        ffn_hidden_size=args.ffn_hidden_size,
        vocab_size=vocab_size(tokenizer.vocab_size, args),
        max_position_embeddings=args.max_position_embeddings,  # None: the positions per sample
        seq_length=args.seq_length,
        position_embedding_type=args.position_embedding_type,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        normalization=args.normalization,
        swiglu=args.swiglu,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        add_bias_linear=not args.disable_bias_linear,
        add_qkv_bias=args.add_qkv_bias,
        rotary_base=args.rotary_base,
        rope_scaling=args.use_rope_scaling,
        rope_scaling_factor=args.rope_scaling_factor,
        norm_epsilon=args.norm_epsilon,
        tokenizer_fingerprint=tokenizer.fingerprint,
        image_size=args.image_size if image else 32,
        image_aspect=args.image_aspect if image else None,
        patch_size=args.patch_size,
        image_token_id=tokenizer.image_token_id if image else None,
        vit_num_layers=args.vit_num_layers,
        vit_hidden_size=args.vit_hidden_size,
        vit_num_attention_heads=args.vit_num_attention_heads,
        vision_model_type=args.vision_model_type,
        vit_activation=args.vit_activation,
        vit_norm_epsilon=args.vit_norm_epsilon,
        image_mean=args.image_mean,
        image_std=args.image_std,
        image_start_id=tokenizer.image_start_id if image else None,
        image_row_id=tokenizer.image_row_id if image else None,
        image_end_id=tokenizer.image_end_id if image else None,
    )


def padded_vocab_size(vocab_size: int, tensor_parallel: int, multiple: int = 128) -> int:
    """Megatron's rule: pad the vocabulary to a multiple of 128 x TP so every shard is even."""
    step = multiple * tensor_parallel
    return ((vocab_size + step - 1) // step) * step


def vocab_size(tokenizer_vocab_size: int, args: argparse.Namespace) -> int:
    """The language model's vocabulary: Megatron's padding of the tokenizer's, or with --lm-load
    the checkpoint's when it holds the tokenizer's ids and tensor parallelism divides it (a
    converted model keeps its exact vocabulary: padding rows would take probability mass)."""
    saved = getattr(args, "lm_load_vocab_size", None)
    tp = args.tensor_model_parallel_size
    if saved is not None and tokenizer_vocab_size <= saved and saved % tp == 0:
        return saved
    return padded_vocab_size(max(tokenizer_vocab_size, saved or 0), tp)


def count_parameters(model_chunks) -> int:
    """Parameters of the whole model (every stage, TP shards once, tied copies once)."""
    local = sum(
        p.numel() for m in model_chunks for p in m.parameters()
        if param_is_not_tensor_parallel_duplicate(p) and not getattr(p, "shared", False)
    )
    total = torch.tensor([local], dtype=torch.int64, device=parallel.device())
    dist.all_reduce(total, group=parallel_state.get_model_parallel_group())
    return int(total.item())


def lr_scheduler(optimizer, args: argparse.Namespace) -> OptimizerParamScheduler:
    """megatron-core's learning-rate and weight-decay schedule for the flags (--lr, --min-lr,
    --lr-decay-style, --lr-warmup-iters, --lr-decay-iters, --weight-decay), stepped in samples:
    ``step(increment=global batch)`` once an iteration. ``optimizer`` is megatron-core's or a
    torch one (anything with ``param_groups``)."""
    gbs = args.global_batch_size
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters * gbs, lr_decay_steps=args.lr_decay_iters * gbs,
        lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay, end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters * gbs, wd_incr_style="constant",
        wsd_decay_steps=(args.lr_decay_iters * gbs) // 10 if args.lr_decay_style == "WSD" else None,
        lr_wsd_decay_style="linear" if args.lr_decay_style == "WSD" else None,
    )


@dataclass
class Trainer:
    args: argparse.Namespace
    model_config: ModelConfig
    model: list
    optimizer: object
    scheduler: OptimizerParamScheduler
    data: TrainingData
    iteration: int = 0
    consumed_samples: int = 0
    # What the run has trained on so far (all ranks); a count a resumed checkpoint did not
    # record is None.
    counts: PositionCounts = field(default_factory=PositionCounts)

    def __post_init__(self) -> None:
        # Built once: the schedule calls it for every micro-batch of every iteration.
        self.forward_step = make_forward_step(self.model_config, self.args.loss, self.args.check_loss_inputs,
                                              self.args.pack_samples, self.args.rho1_ratio)

    # --- set-up ------------------------------------------------------------------------
    @classmethod
    def build(cls, args: argparse.Namespace) -> "Trainer":
        data = build_training_data(args, partial(model_config_from_args, args))
        model_config = model_config_from_args(args, data.tokenizer)
        use_te = args.transformer_impl == "transformer_engine"
        overrides = dict(
            init_method_std=args.init_method_std,
            hidden_dropout=args.hidden_dropout,
            attention_dropout=args.attention_dropout,
            attention_backend=AttnBackend[args.attention_backend],
            sequence_parallel=args.sequence_parallel,
            context_parallel_size=args.context_parallel_size,
            recompute_granularity=args.recompute_granularity,
            recompute_method=args.recompute_method,
            recompute_num_layers=args.recompute_num_layers,
        )
        if use_te:
            overrides.update(fp8=args.fp8_format, fp8_param=False)
        vpp = args.virtual_pipeline_model_parallel_size
        if vpp:
            # As Megatron-LM: interleaved stages overlap their p2p transfers instead of batching
            # them. Batched, the two streams between a pair of ranks (activations to the next
            # stage, gradients to the previous one: the same peer when PP = 2) share one
            # communicator, and gloo pairs them in posting order, mixing them up.
            overrides.update(overlap_p2p_comm=True, batch_p2p_comm=False)
        chunks = [
            build_model(model_config, bf16=args.bf16, use_te=use_te, vp_stage=(i if vpp else None),
                        config_overrides=overrides, fused_linear_ce=args.fused_linear_ce,
                        check_loss_inputs=args.check_loss_inputs)
            for i in range(vpp or 1)
        ]
        for chunk in chunks:
            initialize_weights(chunk, args.seed, std=args.init_method_std, num_layers=args.num_layers)
            chunk.to(parallel.device())
        if args.freeze_vit or args.freeze_lm:  # flags of the H-LVLM only (validate_args)
            for chunk in chunks:
                chunk.freeze(freeze_language_model=args.freeze_lm, freeze_vision_model=args.freeze_vit,
                             freeze_vision_projection=False)
        resuming = args.load is not None and checkpointing.resolve_iteration(args.load) is not None
        if args.lm_load and resuming:
            log.info("--load %s holds a checkpoint: resuming from it, not initialising the language model from "
                     "--lm-load %s", args.load, args.lm_load)
        elif args.lm_load:
            loaded = sum(load_language_model(chunk, args.lm_load) for chunk in chunks)
            log.info("language model initialised from --lm-load %s (%d tensors on this rank)", args.lm_load, loaded)
        if args.vit_load:
            for chunk in chunks:
                load_vision_encoder(chunk, args.vit_load)
        if args.bf16:
            # Megatron's mixed precision: the whole chunk in bf16, inputs cast on the first
            # stage and outputs back to fp32 on the last (main grads and optimizer stay fp32).
            chunks = [Float16Module(chunk.config, chunk) for chunk in chunks]
        config = chunks[0].config
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=args.bf16, overlap_grad_reduce=args.overlap_grad_reduce,
            overlap_param_gather=args.overlap_param_gather, use_distributed_optimizer=args.use_distributed_optimizer)
        model = [
            DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=(i > 0))
            for i, chunk in enumerate(chunks)
        ]
        # As Megatron-LM's training.setup_model_and_optimizer: with the overlaps the schedule
        # starts each chunk's grad reduce (and param gather) itself, so all chunks finish together.
        one = (lambda fns: fns if len(fns) > 1 else fns[0])
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = one([m.no_sync for m in model])
        if args.overlap_grad_reduce:
            config.grad_sync_func = one([m.start_grad_sync for m in model])
        if args.overlap_param_gather:
            config.param_sync_func = one([m.start_param_sync for m in model])
        optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
                adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
                clip_grad=args.clip_grad, bf16=args.bf16, params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
                use_distributed_optimizer=args.use_distributed_optimizer,
            ),
            model,
        )
        scheduler = lr_scheduler(optimizer, args)
        trainer = cls(args, model_config, model, optimizer, scheduler, data)
        if args.load:
            state = checkpointing.load_checkpoint(args.load, model, model_config, optimizer, scheduler)
            if state is not None:
                trainer.iteration = int(state["iteration"])
                trainer.consumed_samples = int(state["consumed_samples"])
                trainer.counts = PositionCounts.from_state(state)
                unknown = [name for name, value in trainer.counts.report(model_config, 0).items() if value is None]
                if unknown:
                    log.warning("%s predates counting them: %s are reported as null for this run", state["checkpoint"],
                                ", ".join(unknown))
                log.info("resumed from %s at iteration %d (%d samples consumed; RNG %s)", state["checkpoint"],
                         trainer.iteration, trainer.consumed_samples,
                         "restored" if state["rng_restored"] else "not restored: parallel layout changed")
            else:
                log.info("--load %s holds no checkpoint yet: starting from scratch", args.load)
        return trainer

    # --- one pass through the pipeline schedule ---------------------------------------
    def _run_schedule(self, batches: Iterator[dict], forward_only: bool) -> dict:
        args = self.args
        vpp = args.virtual_pipeline_model_parallel_size
        if vpp:
            # Every model chunk runs every micro-batch, each pulling it from its own iterator.
            batches = list(batches)
            iterator = [iter(batches) for _ in range(vpp)]
        else:
            iterator = batches
        outputs = get_forward_backward_func()(
            forward_step_func=self.forward_step,
            data_iterator=iterator,
            model=self.model if vpp else self.model[0],
            num_microbatches=args.num_microbatches,
            seq_length=self.model_config.combined_seq_length,
            micro_batch_size=args.micro_batch_size,
            forward_only=forward_only,
        )
        return reduce_logs(outputs)

    def train_step(self) -> tuple[dict, float]:
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        batches = self.data.train_batches(self.consumed_samples)
        logs = self._run_schedule(batches, forward_only=False)
        ok, grad_norm, _ = self.optimizer.step()
        if not ok:
            raise FloatingPointError(f"optimizer step failed at iteration {self.iteration + 1}")
        self.scheduler.step(increment=self.args.global_batch_size)
        self.iteration += 1
        self.consumed_samples += self.args.global_batch_size
        self.counts.add(PositionCounts.of(logs))
        return logs, float(grad_norm) if grad_norm is not None else float("nan")

    @contextlib.contextmanager
    def _parameters_gathered(self) -> Iterator[None]:
        """With --overlap-param-gather the updated parameters arrive during the next training
        forward pass; evaluation and checkpoints need them now (Megatron-LM's
        disable_forward_pre_hook around both)."""
        if not self.args.overlap_param_gather:
            yield
            return
        for m in self.model:
            m.disable_forward_pre_hook()
        try:
            yield
        finally:
            for m in self.model:
                m.enable_forward_pre_hook()

    @torch.no_grad()
    def evaluate(self) -> dict:
        for m in self.model:
            m.eval()
        totals: dict = {}
        with self._parameters_gathered():
            for i in range(self.args.eval_iters):
                logs = self._run_schedule(self.data.valid_batches(i * self.args.global_batch_size), forward_only=True)
                for key, (s, c) in logs.items():
                    a, b = totals.get(key, (0.0, 0.0))
                    totals[key] = (a + s, b + c)
        for m in self.model:
            m.train()
        return totals

    def save(self) -> None:
        with self._parameters_gathered():
            checkpointing.save_checkpoint(
                self.args.save, self.iteration, self.model, self.model_config, self.optimizer, self.scheduler,
                extra=dict(consumed_samples=self.consumed_samples, **asdict(self.counts), args=vars(self.args)),
            )

    # --- the loop ---------------------------------------------------------------------
    def train(self, early_exit: Optional[EarlyExit] = None) -> Optional[dict]:
        """Train to --train-iters (or --exit-interval) and return the summary; None when
        ``early_exit`` stopped the run (after saving): it is not finished, so no summary.json,
        which is what tells a sweep or a resubmitted job that the run still needs --load."""
        args = self.args
        metrics = MetricsLogger(args, self.model_config)
        params = count_parameters([m.module for m in self.model])
        flops_iter = flops_per_iteration(self.model_config, params, args)
        metrics.info(f"model {args.model}: {params:,} parameters; {args.num_microbatches} micro-batches of "
                     f"{args.micro_batch_size} per rank per iteration; loss {args.loss}")
        start_iteration = self.iteration
        wall_start = time.perf_counter()
        window_start, window_iters, window = time.perf_counter(), 0, {}
        last_train, last_eval = None, None
        for m in self.model:
            m.train()
        while self.iteration < args.train_iters:
            logs, grad_norm = self.train_step()
            window_iters += 1
            for key, (s, c) in logs.items():
                a, b = window.get(key, (0.0, 0.0))
                window[key] = (a + s, b + c)
            if self.iteration % args.log_interval == 0 or self.iteration == args.train_iters:
                elapsed = time.perf_counter() - window_start
                last_train = metrics.log_train(
                    self.iteration, window, grad_norm, lr=self.optimizer.param_groups[0]["lr"],
                    samples_per_s=window_iters * args.global_batch_size / elapsed,
                    flops_per_s=window_iters * flops_iter / elapsed, consumed_samples=self.consumed_samples,
                    counts=self.counts,
                    iteration_time_s=elapsed / window_iters, loss_scale=float(self.optimizer.get_loss_scale()))
                window_start, window_iters, window = time.perf_counter(), 0, {}
            if args.eval_iters > 0 and args.eval_interval and self.iteration % args.eval_interval == 0:
                last_eval = metrics.log_eval(self.iteration, self.evaluate())
            saved = bool(args.save and args.save_interval and self.iteration % args.save_interval == 0)
            if saved:
                self.save()
            reason = early_exit.reason() if early_exit is not None else None
            if reason is not None:
                if not saved:
                    self.save()
                metrics.info(f"{reason}: stopped at iteration {self.iteration} of {args.train_iters} after saving "
                             f"a checkpoint to {args.save}; resume with --load {args.save}")
                metrics.close()
                return None
            if args.exit_interval and self.iteration % args.exit_interval == 0:
                metrics.info(f"exit interval reached at iteration {self.iteration}")
                break
        if args.eval_iters > 0 and (last_eval is None or last_eval["iteration"] != self.iteration):
            last_eval = metrics.log_eval(self.iteration, self.evaluate())
        if args.save and not (args.save_interval and self.iteration % args.save_interval == 0):
            self.save()
        wall = time.perf_counter() - wall_start
        return metrics.write_summary(
            iterations=self.iteration, samples=self.consumed_samples, counts=self.counts,
            last_train=last_train, last_eval=last_eval, flops=flops_iter * self.iteration,
            parameters=params, wall_time_s=wall, iterations_this_run=self.iteration - start_iteration,
        )


def run(args: argparse.Namespace) -> Optional[dict]:
    """Train on this rank; the summary, or None for a run stopped early (see Trainer.train)."""
    # Installed first, as Megatron-LM does: a SIGTERM during set-up stops after one iteration.
    early_exit = EarlyExit(args.exit_signal_handler, args.exit_duration_in_mins)
    early_exit.install()
    try:
        parallel.initialize(
            tensor_parallel=args.tensor_model_parallel_size,
            pipeline_parallel=args.pipeline_model_parallel_size,
            virtual_pipeline_parallel=args.virtual_pipeline_model_parallel_size,
            context_parallel=args.context_parallel_size,
            seed=args.seed,
        )
        try:
            return Trainer.build(args).train(early_exit)
        finally:
            parallel.destroy()
    finally:
        early_exit.release()
