"""`Checkpoint`: lazy, read-only tensors of a checkpoint directory, and the errors it raises."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from hf_mergelaw.checkpoints import Checkpoint
from hf_mergelaw.errors import PoolError, UserError
from hf_mergelaw.testing import save_model, tiny_llama_config


class NotATensor:
    """A pickled object that `torch.load(weights_only=True)` refuses to rebuild."""


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config())


@pytest.fixture(scope="module")
def state(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    return model.state_dict()


@pytest.fixture(scope="module")
def single_file(model: LlamaForCausalLM, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model(model, tmp_path_factory.mktemp("single") / "model")


@pytest.fixture(scope="module")
def sharded(model: LlamaForCausalLM, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sharded") / "model"
    model.save_pretrained(path, max_shard_size="10KB")
    return path


@pytest.fixture(scope="module")
def pickled(model: LlamaForCausalLM, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # transformers 5 dropped save_pretrained(safe_serialization=False): write what it wrote.
    path = tmp_path_factory.mktemp("pickled") / "model"
    model.config.save_pretrained(path)
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    return path


def _assert_same_tensors(checkpoint: Checkpoint, state: dict[str, torch.Tensor]) -> None:
    assert sorted(checkpoint.names) == sorted(state)
    for name, expected in state.items():
        assert torch.equal(checkpoint.tensor(name), expected), name


# --- single-file safetensors ----------------------------------------------------------------


def test_single_safetensors_file_lists_every_tensor(
    single_file: Path, state: dict[str, torch.Tensor]
) -> None:
    assert (single_file / "model.safetensors").is_file()
    assert sorted(Checkpoint(single_file, "base").names) == sorted(state)


def test_single_safetensors_file_gives_shapes_from_the_header(
    single_file: Path, state: dict[str, torch.Tensor]
) -> None:
    checkpoint = Checkpoint(single_file, "base")
    assert {name: checkpoint.shape(name) for name in checkpoint.names} == {
        name: tuple(tensor.shape) for name, tensor in state.items()
    }


def test_single_safetensors_file_tensors_equal_the_models(
    single_file: Path, state: dict[str, torch.Tensor]
) -> None:
    _assert_same_tensors(Checkpoint(single_file, "base"), state)


def test_safetensors_checkpoint_is_memory_mapped(single_file: Path) -> None:
    assert Checkpoint(single_file, "base").memory_mapped


def test_checkpoint_reads_its_config(single_file: Path) -> None:
    config = Checkpoint(single_file, "base").config
    assert config["model_type"] == "llama" and config["hidden_size"] == 32


def test_unknown_tensor_name_is_a_key_error_naming_the_label(single_file: Path) -> None:
    with pytest.raises(KeyError, match=re.escape("base: no tensor 'lm_head.bias'")):
        Checkpoint(single_file, "base").tensor("lm_head.bias")


# --- sharded safetensors --------------------------------------------------------------------


def test_sharded_safetensors_checkpoint_is_read_through_its_index(
    sharded: Path, state: dict[str, torch.Tensor]
) -> None:
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    _assert_same_tensors(Checkpoint(sharded, "expert"), state)


def test_sharded_safetensors_checkpoint_gives_shapes_and_is_memory_mapped(
    sharded: Path, state: dict[str, torch.Tensor]
) -> None:
    checkpoint = Checkpoint(sharded, "expert")
    assert checkpoint.memory_mapped
    assert all(checkpoint.shape(name) == tuple(state[name].shape) for name in state)


# --- pickled .bin ---------------------------------------------------------------------------


def test_pickled_bin_checkpoint_loads_with_weights_only(
    pickled: Path, state: dict[str, torch.Tensor]
) -> None:
    _assert_same_tensors(Checkpoint(pickled, "expert"), state)


def test_pickled_bin_checkpoint_gives_shapes_and_is_not_memory_mapped(
    pickled: Path, state: dict[str, torch.Tensor]
) -> None:
    checkpoint = Checkpoint(pickled, "expert")
    assert not checkpoint.memory_mapped
    assert all(checkpoint.shape(name) == tuple(state[name].shape) for name in state)


def test_bin_needing_arbitrary_unpickling_is_refused(
    model: LlamaForCausalLM, state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    model.config.save_pretrained(tmp_path)
    weights = tmp_path / "pytorch_model.bin"
    torch.save({**state, "extra": NotATensor()}, weights)
    with pytest.raises(PoolError) as error:
        Checkpoint(tmp_path, "expert")
    message = str(error.value)
    assert str(weights) in message and "weights_only=True" in message
    assert "Re-save the checkpoint with save_pretrained" in message


# --- bad directories ------------------------------------------------------------------------


def test_path_that_is_not_a_directory_names_the_label(tmp_path: Path) -> None:
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"expert math: {file} is not a directory")
    ):
        Checkpoint(file, "expert math")


def test_missing_path_is_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"base: {tmp_path / 'absent'} is not a directory")
    ):
        Checkpoint(tmp_path / "absent", "base")


def test_directory_without_config_json_is_refused(single_file: Path, tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes((single_file / "model.safetensors").read_bytes())
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"{tmp_path / 'config.json'} is missing")
    ) as error:
        Checkpoint(tmp_path, "base")
    assert str(error.value).startswith("base: ")


def test_config_json_that_is_not_json_is_a_user_error_naming_the_file(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text('{"model_type": "llama",')
    with pytest.raises(UserError) as error:
        Checkpoint(tmp_path, "base")
    assert str(config) in str(error.value) and "not valid JSON" in str(error.value)


def test_directory_without_weights_lists_the_files_looked_for(
    model: LlamaForCausalLM, tmp_path: Path
) -> None:
    model.config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="has no model weights") as error:
        Checkpoint(tmp_path, "base")
    looked_for = [
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
    ]
    for name in looked_for:
        assert name in str(error.value)
