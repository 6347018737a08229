"""One DDPM training step with no host sync: loss, backward, clipping, AdamW, EMA; on CUDA,
optionally replayed as one CUDA graph."""
import copy

import torch

from fastddpm.unet import unwrap_model


class TrainStep:
    """Trains `model` with `loss_fn(model, x0, **model_kwargs) -> scalar loss`.

    `step(x0, **model_kwargs)` returns the detached loss tensor (call `.item()` only when
    logging, since it waits for the device). On CUDA the loss runs under bf16 autocast.
    AdamW is fused on CUDA and CPU. Weights and the EMA stay float32.

    Args:
        optimizer: defaults to AdamW(lr, betas, weight_decay) over the model's parameters.
        ema_decay: EMA rate of `ema_model` (Ho et al.: 0.9999); None keeps no EMA.
        grad_clip: max global gradient norm (Ho et al.: 1.0); None disables clipping.
        warmup_steps: linear LR warm-up from lr / warmup_steps to lr (Ho et al.: 5000).
        compile: True, or a dict of `torch.compile` options, compiles the model and loss as
            one graph (its backward comes from AOTAutograd) after one eager step. The
            optimizer stays eager: its fused or foreach kernels already take a few launches.
        autocast_dtype: "auto" (bf16 on CUDA, none elsewhere), a dtype, or None.
        cuda_graph: capture the whole step (loss, backward, clipping, AdamW, EMA) in one CUDA
            graph and replay it (CUDA only): the first step runs eagerly on a side stream, the
            second is captured, then every step is one replay, with no launch or host cost of
            its own. Needs static shapes (every batch the shape of the first; model_kwargs
            tensors too), a model without host syncs, and the default optimizer (created
            capturable, with a device tensor as learning rate so warm-up reaches the graph).
            The returned loss is a copy; the model and EMA weights are updated in place.
    """

    def __init__(self, model, loss_fn, optimizer=None, *, lr=2e-4, betas=(0.9, 0.999), weight_decay=0.0,
                 ema_decay=0.9999, grad_clip=1.0, warmup_steps=0, compile=False, autocast_dtype="auto",
                 cuda_graph=False):
        base = unwrap_model(model)
        base.to(memory_format=torch.channels_last)
        device = next(base.parameters()).device
        on_cuda = device.type == "cuda"
        # Fused AdamW runs on CUDA and, since torch 2.4, on CPU too (3-6x faster there than
        # foreach, which the CPU runs tensor by tensor); foreach elsewhere.
        fused = device.type in ("cuda", "cpu")
        if cuda_graph and (not on_cuda or optimizer is not None or compile):
            raise ValueError("cuda_graph=True needs a CUDA model, the default optimizer and compile=False "
                             "(torch.compile's mode='reduce-overhead' is the compiled way to CUDA graphs)")
        self.model = model
        self.loss_fn = loss_fn
        self.params = [p for p in base.parameters() if p.requires_grad]
        if cuda_graph:  # a device learning rate, so that warm-up changes reach the captured step
            lr = torch.tensor(float(lr), device=device)
        self.optimizer = optimizer or torch.optim.AdamW(
            self.params, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused, foreach=not fused,
            capturable=bool(cuda_graph))
        self.base_lrs = [float(group["lr"]) for group in self.optimizer.param_groups]
        self.ema_decay = ema_decay
        self.grad_clip = grad_clip
        self.warmup_steps = warmup_steps
        self.autocast_dtype = (torch.bfloat16 if on_cuda else None) if autocast_dtype == "auto" else autocast_dtype
        self.num_steps = 0
        self.ema_model = None
        if ema_decay is not None:
            self.ema_model = copy.deepcopy(base).eval().requires_grad_(False)
            pairs = [(e, p) for e, p in zip(self.ema_model.parameters(), base.parameters()) if p.requires_grad]
            self._ema_params, self._ema_sources = map(list, zip(*pairs))
        self._compiled_loss = None
        self._stepped_eagerly = False
        self._cuda_graph = bool(cuda_graph)
        self._graph = None  # (graph, static x0, static model_kwargs, static loss) once captured
        if compile:
            options = dict(compile) if isinstance(compile, dict) else {}
            if on_cuda:
                options.setdefault("mode", "max-autotune-no-cudagraphs")
            self._compiled_loss = torch.compile(self._autocast_loss, fullgraph=True, **options)

    def step(self, x0, **model_kwargs):
        """One optimisation step on a batch of clean images; returns the detached loss."""
        if self.num_steps < self.warmup_steps:
            scale = (self.num_steps + 1) / self.warmup_steps
            for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
                if isinstance(group["lr"], torch.Tensor):
                    group["lr"].fill_(base_lr * scale)  # on the device: no sync, seen by a captured step
                else:
                    group["lr"] = base_lr * scale
        if x0.ndim == 4:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        if self._cuda_graph:
            loss = self._graphed_step(x0, model_kwargs)
        else:
            loss = self._eager_step(x0, model_kwargs)
        self.num_steps += 1
        return loss

    def _eager_step(self, x0, model_kwargs):
        self.optimizer.zero_grad(set_to_none=True)
        # The first step runs eagerly, so caches that the loss builds lazily (a schedule's
        # device tables, say) exist before tracing instead of failing a guard: a recompile.
        use_compiled = self._compiled_loss is not None and self._stepped_eagerly
        loss = (self._compiled_loss if use_compiled else self._autocast_loss)(x0, **model_kwargs)
        loss.backward()
        self._update()
        self._stepped_eagerly = True
        return loss.detach()

    def _graphed_step(self, x0, model_kwargs):
        """Step 1: eager on a side stream (lazy state, Triton compilation); step 2: capture, then
        replay; later steps: copy the batch into the graph's inputs and replay."""
        if self._graph is None and not self._stepped_eagerly:
            side = torch.cuda.Stream(x0.device)
            side.wait_stream(torch.cuda.current_stream(x0.device))
            with torch.cuda.stream(side):
                loss = self._eager_step(x0, model_kwargs)
            torch.cuda.current_stream(x0.device).wait_stream(side)
            return loss
        if self._graph is None:
            static_x0 = x0.clone()
            static_kwargs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in model_kwargs.items()}
            self.optimizer.zero_grad(set_to_none=True)  # the gradients then live in the graph's pool
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_loss = self._autocast_loss(static_x0, **static_kwargs)
                static_loss.backward()
                self._update()
            self._graph = (graph, static_x0, static_kwargs, static_loss.detach())
        graph, static_x0, static_kwargs, static_loss = self._graph
        if x0.shape != static_x0.shape:
            raise ValueError(f"cuda_graph=True replays the shape it captured: x0 must have shape "
                             f"{tuple(static_x0.shape)}, got {tuple(x0.shape)}")
        if x0.data_ptr() != static_x0.data_ptr():
            static_x0.copy_(x0)
        for key, value in model_kwargs.items():
            if isinstance(value, torch.Tensor):
                static_kwargs[key].copy_(value)
        graph.replay()
        return static_loss.clone()

    def ema_state_dict(self):
        """The EMA weights, loadable into an uncompiled copy of the model."""
        return self.ema_model.state_dict()

    def _autocast_loss(self, x0, **model_kwargs):
        device_type = x0.device.type
        with torch.autocast(device_type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            return self.loss_fn(self.model, x0, **model_kwargs)

    @torch.no_grad()
    def _update(self):
        if self.grad_clip is not None:
            # foreach norms and a device-side clip coefficient: no .item(), no sync.
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
        self.optimizer.step()
        if self.ema_model is not None:
            torch._foreach_lerp_(self._ema_params, self._ema_sources, 1.0 - self.ema_decay)
