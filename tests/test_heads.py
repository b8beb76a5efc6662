"""attrclf.heads: the MLP head keeps its saved parameter names; the query head reads every spatial position."""

import pytest
import torch

from attrclf.heads import HEAD_TYPES, MLPHead, QueryHead, build_head


def test_mlp_head_keeps_the_parameter_names_saved_models_have():
    head = MLPHead(8, 3, hidden=4, dropout=0.5, hidden_dropout=0.3)
    assert [name for name, _ in head.named_parameters()] == [
        "0.weight", "0.bias", "2.weight", "2.bias", "5.weight", "5.bias"]
    assert [n for n, _ in MLPHead(8, 3, hidden=0, dropout=0.5, hidden_dropout=0.3).named_parameters()] == [
        "0.weight", "0.bias", "2.weight", "2.bias"]


@pytest.mark.parametrize("shape", [(2, 16, 3, 5), (2, 7, 16)])
def test_query_head_takes_feature_maps_and_tokens(shape):
    head = QueryHead(16, 4, dim=8, heads=2, layers=2).eval()
    assert head(torch.randn(*shape)).shape == (2, 4)


def test_query_head_sees_a_change_at_one_position_that_pooling_would_average_away():
    torch.manual_seed(0)
    head = QueryHead(6, 3, dim=8, heads=2).eval()
    features = torch.randn(1, 6, 4, 4)
    moved = features.clone()
    moved[0, :, 0, 0], moved[0, :, 3, 3] = features[0, :, 3, 3], features[0, :, 0, 0]  # same mean, other places
    assert torch.allclose(features.mean((2, 3)), moved.mean((2, 3)))
    changed = features.clone()
    changed[0, :, 0, 0] += 3.0  # a strong local mark in one corner
    with torch.no_grad():
        base, corner = head(features), head(changed)
    assert (base - corner).abs().max() > 1e-3


def test_each_attribute_has_its_own_query_and_output_weights():
    torch.manual_seed(0)
    head = QueryHead(6, 3, dim=8, heads=2).eval()
    features = torch.randn(2, 6, 2, 2)
    with torch.no_grad():
        before = head(features)
        head.weight[1].zero_()
        head.bias[1] = 5.0
        after = head(features)
    assert torch.allclose(after[:, 1], torch.full((2,), 5.0))  # attribute 1's logit is its own weight and bias
    assert torch.allclose(after[:, [0, 2]], before[:, [0, 2]])


def test_query_head_trains_its_queries():
    head = QueryHead(6, 3, dim=8, heads=2)
    head(torch.randn(4, 6, 2, 2)).sum().backward()
    assert head.queries.grad is not None and head.queries.grad.abs().sum() > 0


def test_build_head_names_the_choices():
    assert HEAD_TYPES == ("mlp", "query")
    with pytest.raises(ValueError, match="unknown head type 'gap'.*mlp, query"):
        build_head("gap", 8, 2)
