"""One intra-op thread per test process: the suite's models are tiny, and on a 2-core machine shared with
other work, oversubscribed OpenMP threads make them 10-100x slower, not faster."""
import pytest
import torch

torch.set_num_threads(1)


def write_world(d, n_rows: int, vocab_size: int = 400):
    """The embedded world as the pipeline writes it, small: a tokenizer saved in d, and n_rows teacher rows
    (problems with the teacher's solutions). Returns (tokenizer, rows)."""
    import random

    import data
    import world
    tok = world.world_tokenizer(vocab_size=vocab_size, seed=0)
    data.save_tokenizer(tok, d)
    rng = random.Random(0)
    rows = [{**p, "response": world.teacher_solution(p["prompt"], rng), "finish_reason": "stop"}
            for p in world.make_problems(n_rows, seed=0)]
    return tok, rows


@pytest.fixture(scope="session")
def tok():
    """The embedded world's tokenizer (1,024 tokens, seed 0), trained once for the whole run."""
    import world
    return world.world_tokenizer(1024, seed=0)
