"""Training engine shared by SFT and RFT (torch or DeepSpeed, checkpoint/resume,
torchrun/SLURM distributed init) and the SFT stage. ``poserft.train.config`` is stdlib-only;
import the heavy modules (``engine``, ``sft``) explicitly."""
