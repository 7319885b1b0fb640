"""Self-supervised DAAM: the memory bank's k-NN and importance weights against a plain,
row-by-row recomputation of the formulas, and the self-supervised flow against the explicit
reference with autograd on the weighted objective."""

import math
import re

import pytest
import torch
from torch import nn

from captum_daam import DAAM, MemoryBank
from helpers import assert_close_relative, make_images, make_model, module_hook_count
from reference import explicit_daam


def plain_knn(bank_features, bank_labels, queries, k, temperature, relative=False):
    """DINO's weighted k-NN and DAAM's importance weights, one query at a time, in float64.

    Votes are exp(s / T) summed per label; with ``relative``, exp((s - s_nearest) / T), the
    same votes times exp(-s_nearest / T), which cannot overflow (math.exp raises if the plain
    ones do). Ties: equally similar entries are taken in bank order; equal votes go to the
    smaller label.
    """
    bank = bank_features.double() / bank_features.double().norm(dim=1, keepdim=True)
    predictions, weights = [], []
    for query in queries.double():
        query = query / query.norm()
        similarities = [float(query @ entry) for entry in bank]
        order = sorted(range(len(bank)), key=lambda index: (-similarities[index], index))
        nearest = order[: min(k, len(bank))]
        offset = similarities[nearest[0]] if relative else 0.0
        votes = {}
        for index in nearest:
            label = int(bank_labels[index])
            vote = math.exp((similarities[index] - offset) / temperature)
            votes[label] = votes.get(label, 0.0) + vote
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


def random_bank(size=300, width=16, classes=5, seed=0, noise=1.0):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, width, generator=generator) * 2
    labels = torch.randint(0, classes, (size,), generator=generator)
    features = centres[labels] + noise * torch.randn(size, width, generator=generator)
    return features * 7.0, labels  # any scale


def overlapping_bank_and_queries():
    """A bank of 300 entries of 5 overlapping classes, and 40 queries from the same classes."""
    features, labels = random_bank(size=340, noise=3.0)
    return features[:300], labels[:300], features[300:]


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


# ----------------------------------------------------------------- votes at any temperature

WHOLE, CHUNKED = 2**30, 40 * 8 * 7  # one block; 7 bank entries per block of 40 float64 queries


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("budget", [WHOLE, CHUNKED])
@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_ordinary_temperatures_give_the_straightforward_votes(temperature, budget, dtype):
    features, labels, queries = overlapping_bank_and_queries()
    # exp(s / T) itself, in float64: no overflow at these temperatures (math.exp would raise)
    expected_prediction, expected_weights = plain_knn(features, labels, queries, 20, temperature)
    relative_prediction, _ = plain_knn(features, labels, queries, 20, temperature, relative=True)
    assert torch.equal(relative_prediction, expected_prediction)
    bank = MemoryBank(features.to(dtype), labels, memory_budget=budget)
    prediction = bank.classify(queries.to(dtype), temperature=temperature)
    assert torch.equal(prediction, expected_prediction)
    weights, prediction = bank.importance(queries.to(dtype), temperature=temperature)
    assert torch.equal(prediction, expected_prediction)
    tolerance = 1e-10 if dtype == torch.float64 else 1e-4
    assert torch.allclose(weights.double(), expected_weights, rtol=0, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("budget", [WHOLE, CHUNKED])
@pytest.mark.parametrize("temperature", [1e-3, 1e-4])
def test_a_small_temperature_votes_like_the_exact_weighted_vote(temperature, budget, dtype):
    features, labels, queries = overlapping_bank_and_queries()
    expected_prediction, expected_weights = plain_knn(
        features, labels, queries, 20, temperature, relative=True
    )
    assert len(set(expected_prediction.tolist())) == 5  # every class is predicted, not just 0
    # and the temperature matters: a query whose class differs at T = 0.07
    assert not torch.equal(expected_prediction, plain_knn(features, labels, queries, 20, 0.07)[0])
    similarities = (
        nn.functional.normalize(queries.double(), dim=1)
        @ nn.functional.normalize(features.double(), dim=1).T
    )
    largest_similarity = float(similarities.max())
    with pytest.raises(OverflowError):  # the plain votes exp(s / T) overflow even in float64
        math.exp(largest_similarity / temperature)
    bank = MemoryBank(features.to(dtype), labels, memory_budget=budget)
    prediction = bank.classify(queries.to(dtype), temperature=temperature)
    assert torch.equal(prediction, expected_prediction)
    weights, prediction = bank.importance(queries.to(dtype), temperature=temperature)
    assert torch.equal(prediction, expected_prediction)
    tolerance = 1e-10 if dtype == torch.float64 else 1e-4
    assert torch.allclose(weights.double(), expected_weights, rtol=0, atol=tolerance)


def test_similarities_far_above_the_temperature_do_not_overflow_the_votes():
    query = torch.tensor([[1.0, 0.0, 0.0]])
    bank = MemoryBank(torch.tensor([[1.0, 0.5, 0.0], [1.0, 0.1, 0.0]]), torch.tensor([0, 1]))
    with pytest.raises(OverflowError):  # exp(0.894 / 0.001) overflows even float64
        math.exp(0.894 / 1e-3)
    expected_prediction, _ = plain_knn(bank.features, bank.labels, query, 2, 1e-3, relative=True)
    assert expected_prediction.tolist() == [1]  # the nearer entry (similarity 0.995) wins
    assert bank.classify(query, k=2, temperature=1e-3).tolist() == [1]
    assert bank.importance(query, k=2, temperature=1e-3)[1].tolist() == [1]


def test_similarities_far_below_the_temperature_do_not_underflow_the_votes():
    query = torch.tensor([[1.0, 0.0, 0.0]])
    # similarities -0.707, -0.447 and -1: all three plain votes are 0 in float32
    features = torch.tensor([[-1.0, 1.0, 0.0], [-1.0, 0.0, 2.0], [-1.0, 0.0, 0.0]])
    bank = MemoryBank(features, torch.tensor([0, 1, 2]))
    assert float(torch.tensor(-0.447 / 1e-3).exp()) == 0.0
    expected_prediction, _ = plain_knn(features, bank.labels, query, 3, 1e-3, relative=True)
    assert expected_prediction.tolist() == [1]  # the least dissimilar entry wins
    assert bank.classify(query, k=3, temperature=1e-3).tolist() == [1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_votes_that_vanish_next_to_the_nearest_leave_a_tie_to_the_smaller_label(dtype):
    e1 = torch.eye(3, dtype=dtype)[0]
    near_e1 = torch.tensor([0.8, 0.6, 0.0], dtype=dtype)  # similarity 0.8 to e1
    bank = MemoryBank(torch.stack([e1, e1, near_e1]), torch.tensor([4, 2, 4]))
    query = e1.unsqueeze(0)
    # T = 0.07: label 4 votes 1 + exp(-0.2 / 0.07) against label 2's 1, and wins
    assert plain_knn(bank.features, bank.labels, query, 3, 0.07)[0].tolist() == [4]
    assert bank.classify(query, k=3, temperature=0.07).tolist() == [4]
    # T = 1e-4 (and T = 1e-300, below float32's range): exp(-0.2 / T) is 0 even in float64,
    # so labels 4 and 2 both vote 1 and the smaller label wins
    for temperature in (1e-4, 1e-300):
        expected_prediction, _ = plain_knn(
            bank.features, bank.labels, query, 3, temperature, relative=True
        )
        assert expected_prediction.tolist() == [2]
        assert bank.classify(query, k=3, temperature=temperature).tolist() == [2]
        weights, prediction = bank.importance(query, k=3, temperature=temperature)
        # the one neighbour labelled 2 is e1: contributions e1 ⊙ e1 = (1, 0, 0)
        assert prediction.tolist() == [2]
        assert torch.equal(weights, torch.tensor([[1.0, 0.0, 0.0]], dtype=dtype))


@pytest.mark.parametrize("temperature", [0, 0.0, -0.07, float("nan"), float("inf")])
def test_a_temperature_that_is_not_positive_and_finite_is_rejected(temperature):
    bank = MemoryBank(*random_bank(size=10))
    message = rf"positive, finite temperature, e\.g\. 0\.07, got {temperature}\."
    with pytest.raises(ValueError, match=message):
        bank.classify(torch.randn(2, 16), temperature=temperature)
    with pytest.raises(ValueError, match=message):
        bank.importance(torch.randn(2, 16), temperature=temperature)


@pytest.mark.parametrize(
    "temperature,given", [("0.07", "a str"), (None, "a NoneType"), (True, "a bool")]
)
def test_a_temperature_that_is_not_a_real_number_is_rejected(temperature, given):
    bank = MemoryBank(*random_bank(size=10))
    with pytest.raises(TypeError, match=f"temperature as a real number, e.g. 0.07, got {given}"):
        bank.classify(torch.randn(2, 16), temperature=temperature)


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
    "features_complex": (
        lambda: (torch.ones(2, 3, dtype=torch.complex64), torch.zeros(2, dtype=torch.long)),
        "real features .* got dtype torch.complex64",
    ),
    "features_bool": (
        lambda: (torch.ones(2, 3, dtype=torch.bool), torch.zeros(2, dtype=torch.long)),
        "real features .* got dtype torch.bool",
    ),
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
    with pytest.raises(ValueError, match="memory bank file .* got .* with format None"):
        MemoryBank.load(path)
    write_bank_file(path, {"features": torch.ones(2, 2), "labels": torch.zeros(2).long()}, "v9")
    with pytest.raises(ValueError, match="format 'captum-daam-memory-bank-1'.*format 'v9'"):
        MemoryBank.load(path)


def write_bank_file(path, tensors, file_format="captum-daam-memory-bank-1"):
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": file_format})
    return path


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_loading_features_at_any_scale_normalises_them_like_the_constructor(tmp_path, dtype):
    features, labels = random_bank()
    row_scales = torch.rand(len(features), 1, generator=torch.Generator().manual_seed(3)) * 10
    file_features = (features / 7 * (row_scales + 0.1)).to(dtype)  # row norms ~1 to ~100
    path = write_bank_file(
        tmp_path / "bank.safetensors", {"features": file_features, "labels": labels.int()}
    )
    loaded = MemoryBank.load(path, memory_budget=CHUNKED)
    explicit = file_features.double() / file_features.double().norm(dim=1, keepdim=True)
    bank_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    tolerance = 1e-12 if dtype == torch.float64 else 1e-6
    assert loaded.features.dtype == bank_dtype and loaded.labels.dtype == torch.long
    assert torch.allclose(loaded.features.double(), explicit, rtol=0, atol=tolerance)
    assert torch.equal(loaded.features, MemoryBank(file_features, labels).features)
    queries = random_bank(size=40, seed=11)[0].to(bank_dtype)
    expected_prediction, expected_weights = plain_knn(file_features, labels, queries, 20, 0.07)
    assert torch.equal(loaded.classify(queries), expected_prediction)
    weights, prediction = loaded.importance(queries)
    assert torch.equal(prediction, expected_prediction)
    tolerance = 1e-10 if dtype == torch.float64 else 1e-4
    assert torch.allclose(weights.double(), expected_weights, rtol=0, atol=tolerance)


def test_a_zero_feature_row_loads_as_the_constructor_keeps_it(tmp_path):
    features, labels = random_bank(size=20)
    features[4] = 0
    path = write_bank_file(tmp_path / "raw.safetensors", {"features": features, "labels": labels})
    loaded = MemoryBank.load(path)
    explicit = features.double() / features.double().norm(dim=1, keepdim=True).clamp_min(1e-300)
    assert torch.equal(loaded.features[4], torch.zeros(16))
    assert torch.allclose(loaded.features.double(), explicit, rtol=0, atol=1e-6)
    loaded.save(tmp_path / "saved.safetensors")  # normalised with a zero row: kept as it is
    assert torch.equal(MemoryBank.load(tmp_path / "saved.safetensors").features, loaded.features)


BAD_BANK_FILES = {
    "labels_missing": (
        lambda: {"features": torch.randn(4, 3)},
        r"exactly the tensors \['features', 'labels'\] in .*, got \['features'\]",
    ),
    "features_missing": (
        lambda: {"labels": torch.zeros(4, dtype=torch.long)},
        r"exactly the tensors \['features', 'labels'\] in .*, got \['labels'\]",
    ),
    "extra_tensor": (
        lambda: {
            "features": torch.randn(4, 3),
            "labels": torch.zeros(4, dtype=torch.long),
            "names": torch.zeros(4),
        },
        r"got \['features', 'labels', 'names'\]",
    ),
    "features_1d": (
        lambda: {"features": torch.randn(4), "labels": torch.zeros(4, dtype=torch.long)},
        r"features shaped \(M, D\) in .*, got shape \(4,\)",
    ),
    "features_3d": (
        lambda: {"features": torch.randn(4, 3, 2), "labels": torch.zeros(4, dtype=torch.long)},
        r"features shaped \(M, D\) in .*, got shape \(4, 3, 2\)",
    ),
    "features_empty": (
        lambda: {"features": torch.zeros(0, 3), "labels": torch.zeros(0, dtype=torch.long)},
        "non-empty bank in .*, got 0 features",
    ),
    "labels_2d": (
        lambda: {"features": torch.randn(4, 3), "labels": torch.zeros(4, 1, dtype=torch.long)},
        r"1-D integer tensor in .*, got shape \(4, 1\)",
    ),
    "labels_count": (
        lambda: {"features": torch.randn(4, 3), "labels": torch.zeros(5, dtype=torch.long)},
        r"one label per feature \(4\) in .*, got 5",
    ),
    "labels_float": (
        lambda: {"features": torch.randn(4, 3), "labels": torch.zeros(4)},
        "integer labels, got dtype torch.float32",
    ),
    "labels_bool": (
        lambda: {"features": torch.randn(4, 3), "labels": torch.zeros(4, dtype=torch.bool)},
        "integer labels, got dtype torch.bool",
    ),
    "features_complex": (
        lambda: {
            "features": torch.ones(4, 3, dtype=torch.complex64),
            "labels": torch.zeros(4, dtype=torch.long),
        },
        "real features .* got dtype torch.complex64",
    ),
    "features_nan": (
        lambda: {
            "features": torch.tensor([[1.0, float("nan")]]),
            "labels": torch.zeros(1, dtype=torch.long),
        },
        "finite features, got NaN or infinite",
    ),
    "features_inf": (
        lambda: {
            "features": torch.tensor([[1.0, 0.0], [float("-inf"), 0.0]]),
            "labels": torch.zeros(2, dtype=torch.long),
        },
        "finite features, got NaN or infinite",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_BANK_FILES))
def test_bad_bank_files_are_rejected(tmp_path, case):
    make, message = BAD_BANK_FILES[case]
    path = write_bank_file(tmp_path / "bank.safetensors", make())
    with pytest.raises(ValueError, match=message):
        MemoryBank.load(path)


@pytest.mark.parametrize("labels", [[0, -1, 2, 1], [-100, 1, 1, 0], [3, 2, 1, -5]],
                         ids=["unlabelled -1", "ignore_index -100", "last"])
def test_negative_labels_are_refused_naming_the_values(labels, tmp_path):
    features = torch.randn(4, 8)
    negative = [label for label in labels if label < 0]
    with pytest.raises(ValueError, match=rf"non-negative labels in the memory bank, got "
                       rf"\[{negative[0]}\] \(1 entry\): .* means \"no label\""):
        MemoryBank(features, torch.tensor(labels))
    path = write_bank_file(tmp_path / "bank.safetensors",
                           {"features": features, "labels": torch.tensor(labels)})
    with pytest.raises(ValueError, match=rf"non-negative labels in {re.escape(str(path))}, got "
                       rf"\[{negative[0]}\] \(1 entry\): .* means \"no label\""):
        MemoryBank.load(path)


def test_many_negative_labels_are_counted_and_the_first_five_values_named():
    labels = torch.tensor([-1, -1, -1, -100, -2, -3, -4, -5, -6, 0])
    expected = "got [-100, -6, -5, -4, -3, ...] (9 entries)"
    with pytest.raises(ValueError, match=re.escape(expected)):
        MemoryBank(torch.randn(10, 4), labels)


def test_build_refuses_a_batch_with_negative_labels_at_that_batch():
    backbone = make_model("deit_tiny_patch16_224", num_classes=0)
    images = torch.rand(2, 3, 224, 224)
    seen = []

    def loader():
        yield images, torch.tensor([0, 1])
        yield images, torch.tensor([1, -1])
        seen.append("read on")  # never reached: refused at the second batch
        yield images, torch.tensor([0, 0])

    with pytest.raises(ValueError, match=r"non-negative labels.*\[-1\]"):
        MemoryBank.build(backbone, loader(), progress=False)
    assert seen == []


class RecordingDataset(torch.utils.data.Dataset):
    """Tiny images with given labels; remembers which items were read."""

    def __init__(self, labels):
        self.labels, self.read = labels, []

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        self.read.append(index)
        return torch.full((3, 2, 2), float(index)), self.labels[index]


def test_build_refuses_negative_labels_at_that_batch_on_the_distributed_path(process_group):
    dataset = RecordingDataset([0, 1, 1, -1, 0, 0])
    loader = torch.utils.data.DataLoader(dataset, batch_size=2)
    with pytest.raises(ValueError, match=r"non-negative labels in the memory bank, got \[-1\]"):
        MemoryBank.build(nn.Flatten(), loader, progress=False, distributed=True)
    assert dataset.read == [0, 1, 2, 3]  # the third batch is never loaded


@pytest.mark.parametrize("content", ["pickle", "torch.save", "text", "empty", "random bytes"])
def test_loading_a_file_that_is_not_a_bank_says_so(content, tmp_path):
    import pickle

    path = tmp_path / "bank.bin"
    if content == "pickle":
        path.write_bytes(pickle.dumps({"features": [1.0, 2.0]}))
    elif content == "torch.save":
        torch.save({"features": torch.randn(3, 4), "labels": torch.arange(3)}, path)
    elif content == "text":
        path.write_text("features,labels\n0.1,1\n")
    elif content == "random bytes":
        path.write_bytes(bytes(range(256)) * 4)
    else:
        path.write_bytes(b"")
    with pytest.raises(ValueError, match="Expected a memory bank file written by "
                       "MemoryBank.save .* not a safetensors file") as error:
        MemoryBank.load(path)
    assert str(path) in str(error.value)
    assert "Safetensor" not in type(error.value).__name__


def test_an_unreadable_bank_file_keeps_its_os_error(monkeypatch, tmp_path):
    import safetensors

    path = tmp_path / "bank.safetensors"
    MemoryBank(torch.randn(2, 3), torch.tensor([0, 1])).save(path)

    def unreadable(name, **options):  # as root, chmod cannot make a file unreadable
        raise PermissionError(13, "Permission denied", name)

    monkeypatch.setattr(safetensors, "safe_open", unreadable)
    with pytest.raises(PermissionError, match="Permission denied"):  # not "not a safetensors"
        MemoryBank.load(path)


def test_loading_a_folder_or_a_missing_file_names_it(tmp_path):
    with pytest.raises(ValueError, match="a folder"):
        MemoryBank.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        MemoryBank.load(tmp_path / "absent.safetensors")


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
