import torch

from stylekit.tests.fixtures.random_weights import random_state_dict, random_tensor


def test_same_key_and_seed_give_identical_values():
    a = random_tensor("layer.weight", (8, 4), seed=3)
    b = random_tensor("layer.weight", (8, 4), seed=3)
    assert torch.equal(a, b)


def test_values_of_a_key_do_not_depend_on_the_other_keys():
    alone = random_state_dict([("b.weight", (4, 4))], seed=0)
    with_others = random_state_dict([("a.weight", (16, 16)), ("b.weight", (4, 4))], seed=0)
    assert torch.equal(alone["b.weight"], with_others["b.weight"])


def test_seed_changes_values():
    assert not torch.equal(random_tensor("w.weight", (4, 4), 0), random_tensor("w.weight", (4, 4), 1))


def test_weights_are_scaled_by_fan_in_and_norm_gains_start_at_one():
    w = random_tensor("proj.weight", (256, 1024), seed=0, dtype=torch.float32)
    assert abs(w.std().item() - 1024 ** -0.5) < 0.1 * 1024 ** -0.5
    gain = random_tensor("norm.weight", (512,), seed=0, dtype=torch.float32)
    assert abs(gain.mean().item() - 1.0) < 0.01


def test_neutral_buffers_keep_their_neutral_values():
    assert random_tensor("taesd.vae_scale", (), 0).item() == 1.0
    assert random_tensor("taesd.vae_shift", (), 0).item() == 0.0
    ids = random_tensor("embeddings.position_ids", (1, 77), 0)
    assert ids.dtype == torch.int64 and ids[0, -1].item() == 76
