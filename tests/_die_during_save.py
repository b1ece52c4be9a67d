"""``python tests/_die_during_save.py WHERE STEP vlmkit-args...``: run ``vlmkit`` and SIGKILL the
process in the middle of writing the checkpoint of global step STEP.

WHERE is ``model`` (after the tokenizer and half of the weights file are on disk) or ``state``
(everything written into the temporary directory, not yet renamed into place).
"""

import os
import signal
import sys

import vlmkit.models.checkpoint_io as checkpoint_io
import vlmkit.train.checkpoints as checkpoints
from vlmkit.cli import main

where, step = sys.argv[1], int(sys.argv[2])
saving_step = {"now": None}
real_manager_save = checkpoints.CheckpointManager.save
real_save_file = checkpoint_io.safetensors.torch.save_model
real_state = checkpoints.save_training_state


def manager_save(self, model, optimizer, scheduler, progress, *args, **kwargs):
    saving_step["now"] = progress["global_step"]
    return real_manager_save(self, model, optimizer, scheduler, progress, *args, **kwargs)


def save_model(model, filename, *args, **kwargs):
    if where == "model" and saving_step["now"] == step:
        with open(filename, "wb") as f:  # a torn weights file, then death
            f.write(b"\0" * 4096)
            f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save_file(model, filename, *args, **kwargs)


def save_state(directory, *args, **kwargs):
    out = real_state(directory, *args, **kwargs)
    if where == "state" and saving_step["now"] == step:
        os.kill(os.getpid(), signal.SIGKILL)
    return out


checkpoints.CheckpointManager.save = manager_save
checkpoint_io.safetensors.torch.save_model = save_model
checkpoints.save_training_state = save_state
sys.exit(main(sys.argv[3:]))
