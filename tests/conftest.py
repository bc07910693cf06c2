"""One intra-op thread per test process: the suite's models are tiny, and on a 2-core machine shared with
other work, oversubscribed OpenMP threads make them 10-100x slower, not faster."""
import torch

torch.set_num_threads(1)
