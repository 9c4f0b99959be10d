"""An export is reproducible across processes: the same data and config fit bit-identical models.

Each fit runs in its own interpreter, with its own PYTHONHASHSEED (set and dict iteration order) and its own
memory layout, on 2 torch threads and with batches large enough that torch's CPU kernels split their work
between threads: where a kernel adds into shared rows in thread-arrival order, two fits differ in the last bits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from exporter.config import ExportConfig
from exporter.synth import generate

ROOT = Path(__file__).resolve().parent.parent

# Batches of 128 windows x 20 positions x 32 dims: above torch's parallel grain (32768 elements), so every kernel of
# a training step runs on both threads, as it does at the default settings.
CONFIG = ExportConfig.tiny(torch_threads=2, history_len=20, tt_dim=32, tt_batch_size=128, tt_epochs=2)

# Fits retriever, tables and ranker as the final fit of `recsys export` does, then prints a sha256 per artifact.
FIT = """
import hashlib, json, sys
from pathlib import Path

from exporter.config import ExportConfig
from exporter.data import load_dataset
from exporter.fit import fit_models
from exporter.sequences import Sequences, encode_items, item_vocabulary
from exporter.tables import genre_multi_hot
from exporter.train import seed_everything

config = ExportConfig.from_json(Path(sys.argv[2]))
seed_everything(config.seed, config.torch_threads)
ds = load_dataset(Path(sys.argv[1]))
vocab = item_vocabulary(ds.item_ids)
seqs = Sequences.build(ds.user_ids, encode_items(ds.item_ids, vocab), ds.timestamps)
fitted = fit_models(seqs, len(vocab), genre_multi_hot(vocab, ds.genres, ds.genre_names), config, progress=False)


def digest(arrays):
    h = hashlib.sha256()
    for a in arrays:
        h.update(a.tobytes())
    return h.hexdigest()


t = fitted.tables
print(json.dumps({
    "retriever": digest(v.numpy() for v in fitted.retriever.state_dict().values()),
    "ranker": digest(v.numpy() for v in fitted.ranker.state_dict().values()),
    "tables": digest([t.item_emb, t.popularity, t.item_features, t.covisit.indices, t.covisit.scores]),
    "feature_names": fitted.feature_names,
}))
"""


@pytest.fixture(scope="module")
def synth_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    data = tmp_path_factory.mktemp("synth")
    generate(data, n_users=300, n_items=150, n_clusters=6, events_per_user=(20, 60), seed=5)
    config = data / "config.json"
    config.write_text(json.dumps(CONFIG.to_dict()))
    return data, config


def _fit_in_subprocess(data: Path, config: Path, hash_seed: str) -> dict[str, object]:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    done = subprocess.run(
        [sys.executable, "-c", FIT, str(data), str(config)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_two_processes_fit_bit_identical_models(synth_inputs: tuple[Path, Path]) -> None:
    data, config = synth_inputs
    first = _fit_in_subprocess(data, config, "1")
    second = _fit_in_subprocess(data, config, "2")
    assert first == second
