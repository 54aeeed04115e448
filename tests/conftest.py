"""Shared fixtures of the classifier-side tests: offline env, threads, seeding, tiny models, data paths.

* ``tiny_neox``: a random GPT-NeoX causal LM from ``../shared/models/pythia-configs/pythia-14m`` shrunk to
  hidden 32, 2 layers, 4 heads, MLP 64 (offline.md 2.3) with the real Pythia tokenizer;
* ``tiny_bert``: a random 2-layer BERT sequence classifier with an in-memory WordPiece vocabulary;
* ``shared_data``: ``../shared/data``.
"""
from __future__ import annotations

import inspect
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tests/samples.py, tests/dense_oracles.py
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import random
import string
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(2)

ROOT = Path(__file__).resolve().parents[1]
# ../shared beside the checkout, or CONCEPT_EXT_SHARED_DIR (CI's second pass points it at an empty folder:
# a clone without ../shared, where what needs it skips with its reason).
SHARED = Path(__import__("concept_ext.text.data", fromlist=["shared_dir"]).shared_dir()).resolve()
PYTHIA_14M = SHARED / "models" / "pythia-configs" / "pythia-14m"
PYTHIA_TOKENIZER = SHARED / "models" / "pythia-tokenizer"
TINY_NEOX = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, pad_token_id=1)

needs_shared = pytest.mark.skipif(not PYTHIA_14M.is_dir() or not (SHARED / "data").is_dir(),
                                  reason=f"{SHARED} (../shared: configs, tokenizer, data) not present")


def pytest_runtest_setup(item):
    """``@pytest.mark.cpu_kernel(op)``: skip without the compiled CPU kernel, unless the kernels are
    required (``CONCEPT_EXT_REQUIRE_KERNELS=1``, as ``make test`` sets): then a missing kernel fails."""
    for mark in item.iter_markers("cpu_kernel"):
        import concept_ext  # registers the compiled kernels, when built

        for op in mark.args:
            if torch._C._dispatch_has_kernel_for_dispatch_key(f"concept_ext::{op}", "CPU"):
                continue
            why = f"the compiled CPU kernel of concept_ext::{op} is not registered"
            if concept_ext.KERNELS_REQUIRED:
                pytest.fail(f"{why} and {concept_ext.REQUIRE_KERNELS_ENV}=1 requires it", pytrace=False)
            pytest.skip(why)


#: Replays a failed random test: ``CONCEPT_EXT_TEST_SEED=<seed> python -m pytest <test id>``.
SEED_ENV = "CONCEPT_EXT_TEST_SEED"


@pytest.fixture
def rand_seed(request) -> int:
    """A fresh seed per test (``CONCEPT_EXT_TEST_SEED`` to replay one), recorded on the test item and printed
    with its failure report (``pytest_runtest_makereport`` below)."""
    env = os.environ.get(SEED_ENV)
    value = int(env) if env else random.SystemRandom().randrange(2**31)  # SystemRandom: random is seeded 0
    request.node.user_properties.append(("seed", value))
    return value


@pytest.fixture
def rand_gen(rand_seed) -> torch.Generator:
    """A CPU generator seeded with :func:`rand_seed`: the test's random inputs, replayable from its seed."""
    return torch.Generator().manual_seed(rand_seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test that drew a :func:`rand_seed` gets a "random seed" section with the replay command."""
    outcome = yield
    rep = outcome.get_result()
    seeds = [v for k, v in item.user_properties if k == "seed"]
    if rep.failed and seeds:
        rep.sections.append(("random seed", f"seed {seeds[-1]}: replay with "
                                            f"{SEED_ENV}={seeds[-1]} python -m pytest '{item.nodeid}'"))


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return SHARED / "data"


@pytest.fixture(scope="session")
def pythia_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(PYTHIA_TOKENIZER))


def make_tiny_neox(tokenizer=None, seed: int = 0):
    """A fresh tiny GPT-NeoX backbone (random init, seeded)."""
    from concept_ext.classifier.backbones import load_backbone

    return load_backbone(f"config:{PYTHIA_14M}", config_overrides=TINY_NEOX, tokenizer=tokenizer, seed=seed)


@pytest.fixture(scope="session")
def tiny_neox(pythia_tokenizer):
    """Session-wide tiny GPT-NeoX backbone; tests must not modify its weights."""
    return make_tiny_neox(pythia_tokenizer)


def _bert_tokenizer(tmp: Path):
    from transformers import BertTokenizerFast

    words = ("the a an of to and is in it for on with this that was movie film good bad great news "
             "world sports business game team stock market market price company new win lost").split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(string.ascii_lowercase) + list(string.digits)
    vocab += ["##" + c for c in string.ascii_lowercase + string.digits] + list(".,!?'\"-:;()@#/&<>")
    vocab += sorted(set(words))
    ids = {w: i for i, w in enumerate(dict.fromkeys(vocab))}  # "a" is both a letter and a word
    if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters:  # transformers 5: vocab dict
        tok = BertTokenizerFast(vocab=ids, do_lower_case=True)
    else:  # transformers 4: a vocab file
        path = tmp / "vocab.txt"
        path.write_text("\n".join(ids) + "\n")
        tok = BertTokenizerFast(vocab_file=str(path), do_lower_case=True)
    # transformers 5 ignores vocab_file and leaves the 5 special tokens only: every word became [UNK].
    assert len(tok) == len(ids) and tok.convert_tokens_to_ids("movie") == ids["movie"], "tiny BERT vocab not loaded"
    return tok


def make_tiny_bert(tmp: Path, num_labels: int = 4, seed: int = 0):
    """A fresh 2-layer random BERT classifier with a small WordPiece tokenizer."""
    from transformers import BertConfig

    from concept_ext.classifier.backbones import load_backbone

    tok = _bert_tokenizer(tmp)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return load_backbone(cfg, tokenizer=tok, num_labels=num_labels, seed=seed)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny matmuls: on a shared 2-core machine the thread pool's
    overhead dominates there (measured about 20x slower with 2 threads)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
