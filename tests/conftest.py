"""One intra-op thread per test process: the suite's models are tiny, and on a 2-core machine shared with
other work, oversubscribed OpenMP threads make them 10-100x slower, not faster."""
import torch

torch.set_num_threads(1)


def write_world(d, n_rows: int, vocab_size: int = 400):
    """The embedded world as the pipeline writes it, small: a tokenizer saved in d, and n_rows teacher rows
    (problems with the teacher's solutions). Returns (tokenizer, rows)."""
    import random

    import data
    tok = data.world_tokenizer(vocab_size=vocab_size, seed=0)
    data.save_tokenizer(tok, d)
    rng = random.Random(0)
    rows = [{**p, "response": data.teacher_solution(p["prompt"], rng), "finish_reason": "stop"}
            for p in data.make_problems(n_rows, seed=0)]
    return tok, rows
