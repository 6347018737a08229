"""Every option vocabulary of the API, once: the functional ops, the modules, the samplers, the
CLI and the kernels all check against and document these names."""

PREDICTIONS = ("eps", "x0", "v")  # what the model predicts (docs/math.md section 4)
# Other libraries' names for them, accepted wherever a prediction is: diffusers' prediction_type
# and denoising-diffusion-pytorch's objective. `canonical_prediction` is the one place they are read.
PREDICTION_SYNONYMS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0",
                       "pred_noise": "eps", "pred_v": "v", "pred_x0": "x0"}
WEIGHTINGS = ("simple", "vlb", "snr", "min_snr", "p2")  # loss weights over t (docs/math.md section 5)
VARIANCES = ("fixed_small", "fixed_large", "learned_range")  # the reverse step's variance
REDUCTIONS = ("mean", "sum", "none")  # over the batch
CLIP_OPTIONS = (False, True, "dynamic")  # clip_denoised: none, [-1, 1], Imagen's dynamic threshold
LOSS_TYPES = ("hybrid", "kl")  # training on the bound: improved DDPM's hybrid loss, or the rescaled KL
TIMESTEP_SAMPLERS = ("uniform", "loss-second-moment")  # how a training step draws t
SOLVER_METHODS = ("dpm++2m", "dpm++3m", "dpm++2m-sde", "dpm++3m-sde", "euler", "euler-a", "heun", "unipc")
METHODS = ("ddpm", "ddim") + SOLVER_METHODS  # sampling methods: ancestral, DDIM, the few-step solvers
SPACINGS = ("linspace", "leading", "trailing")  # diffusers' timestep spacings
STRATA = ("log", "equal")  # strata of the ELBO's K-sample estimate
SCHEDULES = ("linear", "cosine")  # schedules the command line builds by name

DYNAMIC_THRESHOLD_PERCENTILE = 0.995  # Imagen's percentile of |x0_hat| for clip_denoised="dynamic"


def canonical_prediction(prediction):
    """fastddpm's name of a prediction given by another library's name; anything else as given
    (the caller checks it against PREDICTIONS)."""
    return PREDICTION_SYNONYMS.get(prediction, prediction) if isinstance(prediction, str) else prediction
