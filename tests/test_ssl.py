"""Self-supervised DAAM: the memory bank's k-NN and importance weights against a plain,
row-by-row recomputation of the formulas, and the self-supervised flow against the explicit
reference with autograd on the weighted objective."""

import math

import pytest
import torch
from torch import nn

from captum_daam import DAAM, MemoryBank
from helpers import assert_close_relative, make_images, make_model, module_hook_count
from reference import explicit_daam


def plain_knn(bank_features, bank_labels, queries, k, temperature):
    """DINO's weighted k-NN and DAAM's importance weights, one query at a time, in float64.

    Ties: equally similar entries are taken in bank order; equal votes go to the smaller label.
    """
    bank = bank_features.double() / bank_features.double().norm(dim=1, keepdim=True)
    predictions, weights = [], []
    for query in queries.double():
        query = query / query.norm()
        similarities = [float(query @ entry) for entry in bank]
        order = sorted(range(len(bank)), key=lambda index: (-similarities[index], index))
        nearest = order[: min(k, len(bank))]
        votes = {}
        for index in nearest:
            label = int(bank_labels[index])
            votes[label] = votes.get(label, 0.0) + math.exp(similarities[index] / temperature)
        best = max(votes.values())
        predicted = min(label for label, vote in votes.items() if vote == best)
        carriers = [index for index in nearest if int(bank_labels[index]) == predicted]
        contribution = torch.stack([query * bank[index] for index in carriers]).mean(0)
        low, high = contribution.min(), contribution.max()
        weight = (
            torch.ones_like(contribution) if high == low else (contribution - low) / (high - low)
        )
        predictions.append(predicted)
        weights.append(weight)
    return torch.tensor(predictions), torch.stack(weights)


def random_bank(size=300, width=16, classes=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, width, generator=generator) * 2
    labels = torch.randint(0, classes, (size,), generator=generator)
    features = centres[labels] + torch.randn(size, width, generator=generator)
    return features * 7.0, labels  # any scale


@pytest.mark.parametrize("k,temperature", [(20, 0.07), (5, 0.5), (1, 0.07)])
def test_classify_and_importance_equal_the_plain_computation(k, temperature):
    features, labels = random_bank()
    queries = random_bank(size=8, seed=1)[0]
    expected_prediction, expected_weights = plain_knn(features, labels, queries, k, temperature)
    bank = MemoryBank(features.double(), labels)
    assert torch.equal(
        bank.classify(queries.double(), k=k, temperature=temperature), expected_prediction
    )
    weights, prediction = bank.importance(queries.double(), k=k, temperature=temperature)
    assert torch.equal(prediction, expected_prediction)
    assert torch.allclose(weights, expected_weights, atol=1e-10)
    assert weights.shape == (8, 16) and weights.min() >= 0 and weights.max() <= 1
    float_weights, _ = MemoryBank(features, labels).importance(
        queries, k=k, temperature=temperature
    )
    assert torch.allclose(float_weights.double(), expected_weights, atol=1e-4)


def test_ties_go_to_the_earlier_entry_and_the_smaller_label():
    e1, e2 = torch.eye(3)[0], torch.eye(3)[1]
    bank = MemoryBank(torch.stack([e2, e1, e1, e1]), torch.tensor([0, 4, 2, 9]))
    query = e1.unsqueeze(0)
    assert bank.classify(query, k=1).tolist() == [4]  # index 1 comes before 2 and 3
    assert bank.neighbours(query, k=3)[1].tolist() == [[1, 2, 3]]
    assert bank.classify(query, k=2).tolist() == [2]  # labels 4 and 2 tie: the smaller wins
    expected_prediction, _ = plain_knn(bank.features, bank.labels, query, 2, 0.07)
    assert expected_prediction.tolist() == [2]


def test_ties_across_chunks_still_go_to_the_earlier_entry():
    e1 = torch.eye(4)[0]
    features = torch.stack([torch.eye(4)[1]] * 5 + [e1] * 6)
    labels = torch.arange(11)
    bank = MemoryBank(features, labels, memory_budget=3 * 4)  # chunks of 3 entries for 1 query
    assert bank.neighbours(e1.unsqueeze(0), k=4)[1].tolist() == [[5, 6, 7, 8]]


def test_a_bank_with_one_class_only():
    features, _ = random_bank(size=40)
    labels = torch.full((40,), 7)
    queries = random_bank(size=3, seed=2)[0]
    bank = MemoryBank(features, labels)
    assert bank.classify(queries).tolist() == [7, 7, 7]
    weights, _ = bank.importance(queries.double())
    assert torch.allclose(
        weights.double(), plain_knn(features, labels, queries, 20, 0.07)[1], atol=1e-5
    )


def test_k_larger_than_the_bank_is_clamped():
    features, labels = random_bank(size=12)
    queries = random_bank(size=4, seed=3)[0]
    bank = MemoryBank(features, labels)
    assert torch.equal(bank.classify(queries, k=500), bank.classify(queries, k=12))
    assert torch.equal(bank.importance(queries, k=500)[0], bank.importance(queries, k=12)[0])
    assert bank.neighbours(queries, k=500)[1].shape == (4, 12)


def test_equal_contributions_give_weights_of_ones():
    width = 6
    bank = MemoryBank(torch.ones(3, width), torch.tensor([1, 1, 2]))
    weights, prediction = bank.importance(torch.full((2, width), 3.0), k=3)
    assert torch.equal(weights, torch.ones(2, width))
    assert prediction.tolist() == [1, 1]


def test_a_tiny_memory_budget_gives_the_same_results_as_one_block():
    features, labels = random_bank(size=257)
    queries = random_bank(size=5, seed=4)[0]
    whole = MemoryBank(features, labels, memory_budget=2**30)
    chunked = MemoryBank(features, labels, memory_budget=5 * 4 * 7)  # 7 entries per chunk
    for k in (1, 20, 300):
        whole_similarities, whole_indices = whole.neighbours(queries, k)
        chunked_similarities, chunked_indices = chunked.neighbours(queries, k)
        assert torch.equal(whole_indices, chunked_indices)
        # the matrix product's rounding may differ with the block's shape, by an ulp or so
        assert torch.allclose(whole_similarities, chunked_similarities, rtol=0, atol=1e-6)
        assert torch.equal(whole.classify(queries, k), chunked.classify(queries, k))
        assert torch.equal(whole.importance(queries, k)[0], chunked.importance(queries, k)[0])


def test_the_similarity_block_stays_within_the_budget(monkeypatch):
    features, labels = random_bank(size=1000)
    queries = random_bank(size=4, seed=5)[0]
    budget = 4 * 4 * 64  # 64 entries of 4 queries in float32
    bank = MemoryBank(features, labels, memory_budget=budget)
    largest = []
    matmul = torch.Tensor.__matmul__

    def logging_matmul(left, right):
        result = matmul(left, right)
        largest.append(result.numel() * result.element_size())
        return result

    monkeypatch.setattr(torch.Tensor, "__matmul__", logging_matmul)
    bank.neighbours(queries, k=20)
    monkeypatch.undo()
    assert len(largest) == math.ceil(1000 / 64)
    assert max(largest) <= budget


BAD_BANKS = {
    "labels_2d": (lambda: (torch.randn(4, 3), torch.zeros(4, 1, dtype=torch.long)), "1-D integer"),
    "labels_float": (lambda: (torch.randn(4, 3), torch.zeros(4)), "integer labels"),
    "labels_length": (
        lambda: (torch.randn(4, 3), torch.zeros(5, dtype=torch.long)),
        r"one label per feature \(4\), got 5",
    ),
    "features_nan": (
        lambda: (torch.tensor([[1.0, float("nan")]]), torch.zeros(1, dtype=torch.long)),
        "finite",
    ),
    "features_inf": (
        lambda: (torch.tensor([[1.0, float("inf")]]), torch.zeros(1, dtype=torch.long)),
        "finite",
    ),
    "empty": (lambda: (torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)), "non-empty"),
    "features_1d": (lambda: (torch.zeros(3), torch.zeros(3, dtype=torch.long)), r"\(M, D\)"),
}


@pytest.mark.parametrize("case", sorted(BAD_BANKS))
def test_bad_banks_are_rejected(case):
    make, message = BAD_BANKS[case]
    with pytest.raises(ValueError, match=message):
        MemoryBank(*make())


@pytest.mark.parametrize("k", [0, -3, 2.5, True])
def test_k_below_one_or_not_an_integer_is_rejected(k):
    bank = MemoryBank(*random_bank(size=10))
    with pytest.raises(ValueError, match="k to be an integer of at least 1"):
        bank.classify(torch.randn(2, 16), k=k)


def test_queries_of_the_wrong_width_are_rejected():
    bank = MemoryBank(*random_bank(size=10))
    with pytest.raises(ValueError, match="width 16.*got 15"):
        bank.importance(torch.randn(2, 15))


def test_save_and_load_round_trip_without_pickle(tmp_path):
    features, labels = random_bank(size=30)
    bank = MemoryBank(features, labels)
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    loaded = MemoryBank.load(path)
    assert torch.equal(loaded.features, bank.features)
    assert torch.equal(loaded.labels, bank.labels)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:  # a plain safetensors file
        assert set(handle.keys()) == {"features", "labels"}
    pickled = tmp_path / "bank.pt"
    torch.save({"features": features, "labels": labels}, pickled)
    with pytest.raises(Exception):
        MemoryBank.load(pickled)


def test_loading_another_safetensors_file_is_rejected(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file(
        {"features": torch.zeros(2, 2), "labels": torch.zeros(2, dtype=torch.long)}, str(path)
    )
    with pytest.raises(ValueError, match="memory bank file"):
        MemoryBank.load(path)


# ----------------------------------------------------------------- building a bank


def synthetic_loader(batches=3, batch_size=4, size=224, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.rand(batch_size, 3, size, size, generator=generator),
            torch.randint(0, 3, (batch_size,), generator=generator),
        )
        for _ in range(batches)
    ]


def test_build_runs_in_eval_mode_without_gradients_and_restores_modes():
    backbone = make_model("deit_tiny_patch16_224", num_classes=0)
    backbone.train()
    backbone.blocks[2].eval()
    modes = [module.training for module in backbone.modules()]
    seen = []
    handle = backbone.blocks[0].register_forward_hook(
        lambda module, args, output: seen.append((module.training, torch.is_grad_enabled()))
    )
    loader = synthetic_loader()
    try:
        bank = MemoryBank.build(backbone, loader, progress=False)
    finally:
        handle.remove()
    assert seen == [(False, False)] * 3
    assert [module.training for module in backbone.modules()] == modes
    assert all(parameter.grad is None for parameter in backbone.parameters())
    backbone.eval()
    with torch.no_grad():
        expected = torch.cat([backbone(images) for images, _ in loader])
    assert len(bank) == 12 and bank.dim == 192
    assert torch.allclose(bank.features, nn.functional.normalize(expected, dim=1), atol=1e-6)
    assert torch.equal(bank.labels, torch.cat([labels for _, labels in loader]))


def test_build_restores_modes_when_a_batch_fails():
    backbone = make_model("deit_tiny_patch16_224", num_classes=0).train()

    def failing_loader():
        yield synthetic_loader(batches=1)[0]
        raise OSError("unreadable image")

    with pytest.raises(OSError):
        MemoryBank.build(backbone, failing_loader(), progress=False)
    assert all(module.training for module in backbone.modules())


# ----------------------------------------------------------------- self-supervised DAAM


@pytest.fixture(scope="module")
def backbone():
    return make_model("deit_tiny_patch16_224", num_classes=0)


def test_self_supervised_flow_equals_the_explicit_weighted_objective(backbone):
    images = make_images(3)
    generator = torch.Generator().manual_seed(0)
    per_example = torch.rand(3, 192, generator=generator)
    shared = torch.rand(192, generator=generator)
    daam = DAAM(backbone)
    for weights in (per_example, shared):
        expected = explicit_daam(backbone, images, importance=weights, relu_gradients=False)
        flow = daam.attribute(images, importance=weights, return_flow=True)
        assert_close_relative(flow, expected["flow"])
        maps = daam.attribute(images, importance=weights, return_flow=True, accumulate=False)
        assert_close_relative(maps, expected["block_maps"])


def test_relu_gradients_overrides_either_default(backbone):
    images = make_images(2)
    weights = torch.rand(2, 192, generator=torch.Generator().manual_seed(1))
    with_relu = DAAM(backbone).attribute(
        images, importance=weights, relu_gradients=True, return_flow=True
    )
    expected = explicit_daam(backbone, images, importance=weights, relu_gradients=True)
    assert_close_relative(with_relu, expected["flow"])
    supervised = make_model("deit_tiny_patch16_224")
    without_relu = DAAM(supervised).attribute(
        images, target=[3, 4], relu_gradients=False, return_flow=True
    )
    expected = explicit_daam(supervised, images, target=[3, 4], relu_gradients=False)
    assert_close_relative(without_relu, expected["flow"])
    assert not torch.allclose(
        without_relu, DAAM(supervised).attribute(images, target=[3, 4], return_flow=True)
    )


def test_a_bank_gives_the_weights_of_the_backbones_own_output_in_one_forward(backbone):
    images = make_images(3, seed=2)
    bank = MemoryBank(*random_bank(size=60, width=192))
    with torch.no_grad():
        weights, _ = bank.importance(backbone(images))
    calls = []
    handle = backbone.register_forward_hook(lambda *args: calls.append(1))
    try:
        flow = DAAM(backbone).attribute(images, importance=bank, return_flow=True)
    finally:
        handle.remove()
    assert calls == [1]
    expected = explicit_daam(backbone, images, importance=weights, relu_gradients=False)
    assert_close_relative(flow, expected["flow"])
    custom = DAAM(backbone).attribute(images, importance=lambda f: bank.importance(f, k=20))
    assert_close_relative(custom, flow[:, -1:], 1e-6)


def test_importance_errors_are_raised_before_the_forward(backbone):
    images = make_images(2)
    daam = DAAM(backbone)
    calls = []
    handle = backbone.patch_embed.register_forward_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(ValueError, match="either target .* or importance"):
            daam.attribute(images, target=1, importance=torch.ones(192))
        with pytest.raises(ValueError, match="output width 192, got width 100"):
            daam.attribute(images, importance=torch.ones(100))
        with pytest.raises(ValueError, match=r"\(D,\) or \(B=2, D\), got \(3, 192\)"):
            daam.attribute(images, importance=torch.ones(3, 192))
        with pytest.raises(ValueError, match="output width 192, got a bank of width 16"):
            daam.attribute(images, importance=MemoryBank(*random_bank(size=10)))
        with pytest.raises(ValueError, match="finite"):
            daam.attribute(images, importance=torch.full((192,), float("nan")))
        with pytest.raises(TypeError, match="importance"):
            daam.attribute(images, importance="bank")
    finally:
        handle.remove()
    assert calls == []
    assert module_hook_count(backbone) == 0


def test_end_to_end_bank_from_a_loader_save_load_and_attribute(tmp_path):
    backbone = make_model("vit_small_patch16_224", num_classes=0, img_size=96)
    loader = synthetic_loader(batches=4, batch_size=5, size=96, seed=7)
    bank = MemoryBank.build(backbone, loader, progress=False)
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    bank = MemoryBank.load(path)
    images = make_images(2, 96, 96, seed=8)
    with torch.no_grad():
        features = backbone(images)
    predicted = bank.classify(features, k=5)
    weights, predicted_too = bank.importance(features, k=5)
    assert torch.equal(predicted, predicted_too)
    assert set(predicted.tolist()) <= set(bank.labels.tolist())
    flow = DAAM(backbone).attribute(
        images, importance=lambda f: bank.importance(f, k=5), return_flow=True
    )
    assert flow.shape == (2, 12, 6, 6)
    expected = explicit_daam(backbone, images, importance=weights, relu_gradients=False)
    assert_close_relative(flow, expected["flow"])


@pytest.mark.parametrize("budget", [2**30, 3 * 4 * 13])
def test_many_exact_ties_are_ordered_by_bank_position(budget):
    generator = torch.Generator().manual_seed(9)
    distinct = torch.randn(5, 8, generator=generator)
    features = distinct[torch.randint(0, 5, (200,), generator=generator)]
    labels = torch.randint(0, 4, (200,), generator=generator)
    queries = torch.randn(3, 8, generator=generator)
    bank = MemoryBank(features, labels, memory_budget=budget)
    for k in (1, 7, 45, 200):
        _, indices = bank.neighbours(queries, k)
        similarities = (
            nn.functional.normalize(queries.double(), dim=1)
            @ nn.functional.normalize(features.double(), dim=1).T
        )
        for row, query_similarities in enumerate(similarities.tolist()):
            expected = sorted(range(200), key=lambda i: (-round(query_similarities[i], 9), i))[:k]
            assert indices[row].tolist() == expected
        expected_prediction, expected_weights = plain_knn(features, labels, queries, k, 0.07)
        assert torch.equal(bank.classify(queries, k), expected_prediction)


def test_a_copy_on_another_device_keeps_the_features_bit_for_bit():
    bank = MemoryBank(*random_bank(size=20))
    copy = bank.to("cpu")
    assert copy is not bank
    assert torch.equal(copy.features, bank.features) and torch.equal(copy.labels, bank.labels)
