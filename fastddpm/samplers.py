"""The sampling loops behind `fastddpm.sample`, one fused step per model call (docs/math.md sections 4, 8).

Each loop takes `denoise(x_t, t, x0_hat) -> model output` (guidance already wrapped in; x0_hat is
the previous step's, None at the first, for self-conditioning), the starting x, the per-step times
already on the device (row k is step k's, so the loop never synchronises with the host), the
Philox seeds of every step (drawn at once; None on the PyTorch path, which draws with
`generator`), or `noise_fn(k, x)` giving step k's noise, and `callback(step, t, x, x0_hat)`.
"""
import torch

from . import functional as F
from .functional import solvers as S

MULTISTEP = {"dpm++2m": 2, "dpm++3m": 3, "dpm++2m-sde": 2, "dpm++3m-sde": 3, "unipc": 2}
STOCHASTIC = ("dpm++2m-sde", "dpm++3m-sde", "euler-a")


def ancestral_loop(denoise, x, schedule, *, method, eta, t_steps, t_prev_steps, model_t_steps, seeds, generator,
                   options, callback, progress, cuda_graph, noise_fn=None, draws=None, self_condition=False):
    """DDPM (method "ddpm": `functional.p_sample_step`) or DDIM (`functional.ddim_step` from t to
    t_prev) over the rows of `t_steps`; returns (x_0, the last x0_hat or None). With `noise_fn`, step
    k's noise is noise_fn(k, x) where `draws[k]` (a host list), zero elsewhere."""
    wants_x0_hat = callback is not None or options["return_x0_hat"] or self_condition

    def step(x, t, t_prev, model_t, seed, noise=None, x0_hat=None):
        """(x_{t-1}, x0_hat or None): one model call and one fused step."""
        out = denoise(x, model_t, x0_hat)
        drawn = seed is not None or noise is not None
        kwargs = dict(options, return_x0_hat=wants_x0_hat, seed=seed, noise=noise, generator=None if drawn else generator)
        if method == "ddpm":
            result = F.p_sample_step(out, x, t, schedule, **kwargs)
        else:
            kwargs.pop("variance")
            result = F.ddim_step(out, x, t, t_prev, schedule, eta=eta, **kwargs)
        return result if wants_x0_hat else (result, None)

    n = t_steps.shape[0]
    if cuda_graph:
        run_step = _graphed_step(step, x, (t_steps, t_prev_steps, model_t_steps, seeds))
    else:
        def run_step(x, k, x0_hat):
            noise = None if noise_fn is None else noise_fn(k, x) if draws[k] else torch.zeros_like(x)
            return step(x, t_steps[k], t_prev_steps[k], model_t_steps[k], None if seeds is None else seeds[k:k + 1],
                        noise, x0_hat if self_condition else None)

    x0_hat = None
    for k in progress(range(n)):
        x, x0_hat = run_step(x, k, x0_hat)
        if callback is not None:
            callback(k, model_t_steps[k], x, x0_hat)
    if cuda_graph:  # the graph's static buffers are overwritten by the next replay
        x, x0_hat = x.clone(), None if x0_hat is None else x0_hat.clone()
    return x, x0_hat


def solver_loop(denoise, x, schedule, *, method, plan, orders, correctors, solver_type, seeds, noise_fn, generator,
                options, callback, progress):
    """The few-step solvers on the plan's sigmas (each step reads σ: time="sigma"): DPM-Solver++
    (2M, 3M, their SDE variants), UniPC, Euler, Euler ancestral and Heun (two model calls a step
    but the last). Returns (x_0, the last x0_hat)."""
    n, batch = plan.timesteps.numel(), x.shape[0]
    model_t = plan.timesteps.to(x.device)[:, None].expand(n, batch).contiguous()
    sigmas = plan.sigmas.to(x.device)[:, None].expand(n + 1, batch).contiguous()

    def noise(k):
        return (noise_fn(k, x) if noise_fn is not None else None), (None if seeds is None else seeds[k:k + 1])

    history = []  # (x0_hat, σ row) of the previous steps, newest first
    x0_hat = None
    for k in progress(range(n)):
        out = denoise(x, model_t[k], x0_hat)
        times = [sigmas[k], sigmas[k + 1]]
        if method == "unipc":
            used = history[:max(orders[k] - 1, correctors[k])]
            x_next, x0_hat = S.unipc_update(out, x, times + [s for _, s in used], [h for h, _ in used], schedule,
                                            time="sigma", order=orders[k], corrector_order=correctors[k], **options)
        elif method in MULTISTEP:
            used = history[:orders[k] - 1]
            sde = method.endswith("-sde")
            z, seed = noise(k) if sde else (None, None)
            x_next, x0_hat = S.dpm_solver_update(out, x, times + [s for _, s in used], [h for h, _ in used],
                                                 schedule, time="sigma", sde=sde, heun=solver_type == "heun",
                                                 noise=z, seed=seed, generator=generator, **options)
        elif method == "heun":
            x_next, x0_hat = S.euler_update("euler", out, x, times, schedule, time="sigma", **options)
            if k < n - 1:  # the last step, to σ = 0, is Euler's alone
                out = denoise(x_next, model_t[k + 1], x0_hat)
                x_next, x0_hat = S.euler_update("heun", out, x_next, times, schedule, time="sigma", first=x0_hat,
                                                **options)
        else:
            z, seed = noise(k) if method == "euler-a" else (None, None)
            x_next, x0_hat = S.euler_update("ancestral" if method == "euler-a" else "euler", out, x, times, schedule,
                                            time="sigma", noise=z, seed=seed, generator=generator, **options)
        x = x_next
        history = [(x0_hat, sigmas[k])] + history[:1]
        if callback is not None:
            callback(k, model_t[k], x, x0_hat)
    return x, x0_hat


def _graphed_step(step, x, rows):
    """run_step(x, k) replaying one captured step (CUDA, Triton backend); x lives in the graph's
    static input buffer, and step k's rows are copied into the graph's static inputs."""
    static_x = x.clone()
    static_rows = [None if r is None else r[:1].clone() for r in rows]

    def inputs():
        t, t_prev, model_t, seed = static_rows
        return t[0], t_prev[0], model_t[0], seed

    # warm up on a side stream (Triton compilation, lazy initialisation), then capture
    stream = torch.cuda.Stream(x.device)
    stream.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            step(static_x, *inputs())
    torch.cuda.current_stream(x.device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        x_prev, x0_hat = step(static_x, *inputs())
        static_x.copy_(x_prev)

    def run_step(x, k, _):
        for static, row in zip(static_rows, rows):
            if static is not None:
                static.copy_(row[k:k + 1])
        graph.replay()
        return static_x, x0_hat

    return run_step
