"""Hostile cases (issue 19): an interrupted fine-tune resumes from its checkpoint and ends where an
uninterrupted run ends; a corrupt saved folder is refused with a clear error, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from agent.domain.errors import ArtifactMismatchError  # noqa: E402
from agent.tasks.encoder import EncoderClassifier, FineTuneConfig, fine_tune  # noqa: E402

TEXTS = [f"item cat {c} views {v} carts {k}" for c in "ab" for v in range(3) for k in range(2)]
LABELS = [int(k == 1 and v > 0) for c in "ab" for v in range(3) for k in range(2)]
VAL = (TEXTS[:6], [0, 1, 0, 1, 0, 1])


def _cfg() -> FineTuneConfig:
    return FineTuneConfig(batch_size=4, eval_every=1, max_steps=3, patience=10, threads=1, max_len=16)


class Stop(Exception):
    pass


def test_interrupted_fine_tune_resumes(tmp_path: Path) -> None:
    ref, _ = fine_tune((TEXTS, LABELS), VAL, _cfg())
    work = tmp_path / "enc.work"

    def boom(step: int, total: int, loss: float | None) -> None:
        if step == 2:
            raise Stop

    with pytest.raises(Stop):
        fine_tune((TEXTS, LABELS), VAL, _cfg(), work_dir=work, progress=boom)
    assert (work / "checkpoint" / "state.pt").exists()
    clf, hist = fine_tune((TEXTS, LABELS), VAL, _cfg(), work_dir=work)
    assert hist.resumed_from == 2 and hist.steps == 3
    assert not work.exists()  # cleaned after success
    # two uninterrupted runs agree exactly; a resumed one should too (dropout RNG state is not restored)
    np.testing.assert_allclose(clf.margins(TEXTS), ref.margins(TEXTS), atol=1e-4)


@pytest.mark.parametrize("manifest", ["{oops", "", "[]", '{"dataset": "d", "task": "purchase", "template": "t"}'])
def test_corrupt_manifest_is_a_clear_error(tmp_path: Path, manifest: str) -> None:
    (tmp_path / "manifest.json").write_text(manifest, encoding="utf-8")
    (tmp_path / "calibration.json").write_text("{}", encoding="utf-8")
    with pytest.raises((ArtifactMismatchError, FileNotFoundError)):
        EncoderClassifier.load(tmp_path, dataset="d", task="purchase", template="t", fix="retrain")


def test_manifest_fields_are_tamper_checked(tmp_path: Path) -> None:
    """Editing the manifest's horizon_h (not covered by the file hashes) must be refused."""
    clf, _ = fine_tune((TEXTS, LABELS), VAL, FineTuneConfig(batch_size=4, max_steps=1, threads=1, max_len=16))
    folder = clf.save(tmp_path / "enc", {"dataset": "d", "task": "purchase", "template": "t", "horizon_h": 24.0})
    man = json.loads((folder / "manifest.json").read_text())
    man["horizon_h"] = 48.0
    (folder / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ArtifactMismatchError):
        EncoderClassifier.load(folder, dataset="d", task="purchase", template="t", fix="retrain")
