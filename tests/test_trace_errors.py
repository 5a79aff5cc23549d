"""Errors on the client, raised before anything runs, each naming the user's line."""

import pytest
import torch

from swarmlens.intervene import InvalidGraphError, OrderError, TraceError
from swarmlens.intervene.envoy import ModulePathError

PROMPT = "The capital of France is"


def test_unknown_submodule_names_line_and_suggests(local_model):
    with pytest.raises(ModulePathError) as raised:
        with local_model.trace(PROMPT):
            local_model.model.layers[3].mlpp.output.save()
    message = str(raised.value)
    assert "'mlpp'" in message
    assert "Did you mean 'mlp'" in message
    assert "test_trace_errors.py" in message
    assert "local_model.model.layers[3].mlpp.output.save()" in message


def test_block_index_out_of_range(local_model):
    with pytest.raises(ModulePathError, match="index 30 is out of range .* 30 modules"):
        with local_model.trace(PROMPT):
            local_model.model.layers[30].output.save()


def test_function_outside_whitelist_suggests_nearest(local_model):
    with pytest.raises(TraceError) as raised:
        with local_model.trace(PROMPT):
            torch.logsumexp(local_model.model.layers[2].output, dim=-1).save()
    message = str(raised.value)
    assert "torch.logsumexp is not allowed" in message
    assert "test_trace_errors.py" in message


def test_method_outside_whitelist_suggests_nearest(local_model):
    with pytest.raises(TraceError) as raised:
        with local_model.trace(PROMPT):
            local_model.model.layers[2].output.softmaxx(-1)
    assert "Did you mean 'softmax'" in str(raised.value)


def test_write_from_later_site_is_rejected(local_model):
    with pytest.raises(OrderError) as raised:
        with local_model.trace(PROMPT):
            local_model.model.layers[3].output = local_model.model.layers[10].output
    message = str(raised.value)
    assert "model.layers.10.output" in message
    assert "runs later" in message
    assert "local_model.model.layers[3].output = local_model.model.layers[10].output" in message


def test_slice_edit_from_later_site_is_rejected(local_model):
    with pytest.raises(OrderError, match="edits model.layers.5.output in place"):
        with local_model.trace(PROMPT):
            local_model.model.layers[5].output[:, -1] = local_model.model.layers[9].output[:, -1]


def test_module_called_after_its_block_is_rejected(local_model):
    with pytest.raises(OrderError, match="lives on block 3"):
        with local_model.trace(PROMPT):
            local_model.model.layers[3].mlp(local_model.model.layers[8].output).save()


def test_branching_on_proxy_is_rejected(local_model):
    with pytest.raises(TraceError, match="torch.where"):
        with local_model.trace(PROMPT):
            if local_model.model.layers[1].output.sum() > 0:
                pass


def test_root_has_no_site(local_model):
    with pytest.raises(ModulePathError, match="lm_head.output"):
        with local_model.trace(PROMPT):
            local_model.model.output.save()


def test_value_before_exit_raises(local_model):
    with local_model.trace(PROMPT):
        hidden = local_model.model.layers[1].output.save()
        with pytest.raises(TraceError, match="only after"):
            hidden.value


def test_unsaved_value_has_no_value(local_model):
    with local_model.trace(PROMPT):
        hidden = local_model.model.layers[1].output
    with pytest.raises(TraceError, match="only values marked with .save"):
        hidden.value


def test_slice_bound_from_proxy_is_invalid(local_model):
    with pytest.raises(InvalidGraphError, match="slice bounds must be ints"):
        with local_model.trace(PROMPT):
            hidden = local_model.model.layers[1].output
            hidden[:, : hidden.shape[1]].save()


def test_invalid_input_type(local_model):
    with pytest.raises(TypeError, match="inputs must be a string"):
        local_model.trace(3.5)


def test_hasattr_on_model_and_envoy(local_model):
    assert hasattr(local_model, "model")
    assert not hasattr(local_model, "decoder")
    assert not hasattr(local_model.model.layers[0], "attention")


@pytest.mark.parametrize("prompts", ["", ["A prompt", ""]])
def test_empty_prompt_is_rejected(local_model, prompts):
    with pytest.raises(ValueError, match="every prompt must be a non-empty string"):
        with local_model.trace(prompts):
            pass
