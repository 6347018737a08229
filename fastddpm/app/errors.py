"""The errors a user can fix: bad data, a missing or corrupt checkpoint, a diverged or stopped
run. The command line prints each as one line."""


class DataError(ValueError):
    """The data set cannot be used for training (empty, mixed sizes, wrong shape or dtype)."""


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or not a fastddpm checkpoint."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; `step` is the first step that produced it."""

    def __init__(self, step, value, checkpoint):
        self.step, self.value, self.checkpoint = step, value, checkpoint
        saved = (f"the last good checkpoint is {checkpoint}" if checkpoint
                 else "no checkpoint was saved before it")
        super().__init__(f"the loss became {value} at step {step}; training stopped and {saved}. "
                         "Try a lower --lr, gradient clipping (--grad-clip) or check the data")


class TrainingInterrupted(RuntimeError):
    """The run was stopped by a signal after saving a checkpoint at `step`."""

    def __init__(self, step, checkpoint):
        self.step, self.checkpoint = step, checkpoint
        super().__init__(f"interrupted at step {step}; saved {checkpoint}: continue with --resume")
