"""tasks/: the catalog matches the data; a task is a pure function of its key; episodes
have the N-way K-shot shape; splits are disjoint; each family has its stated law."""

from __future__ import annotations

import numpy as np
import pytest

from metapeft_dist.config import FamilySpec
from metapeft_dist.tasks import make_family
from metapeft_dist.tasks.base import TaskKey, keyed_uniforms, sample_batch
from metapeft_dist.tasks.catalog import FAMILIES
from metapeft_dist.tasks.digits import SPLIT_DIGITS, load_classes, shift, split_classes
from metapeft_dist.tasks.gaussian import Gaussian
from metapeft_dist.tasks.sinusoid import Sinusoid


FAMS = {name: make_family(FamilySpec(name=name)) for name in ("sinusoid", "gaussian", "digits")}


def test_digits_catalog_matches_the_data():
    classes = load_classes()
    info = FAMILIES["digits"]
    assert min(len(v) for v in classes.values()) == info.min_class_size
    for split, count in info.classes_per_split.items():
        assert len(split_classes(split)) == count
    assert next(iter(classes.values())).shape[1:] == info.input_shape
    all_images = np.concatenate(list(classes.values()))
    assert all_images.min() == 0.0 and all_images.max() == 1.0


def test_bundled_digits_are_sklearns_without_importing_it():
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from metapeft_dist.tasks.digits import bundled_digits

    images, target = bundled_digits()
    data = load_digits()
    np.testing.assert_array_equal(images, data.images)
    np.testing.assert_array_equal(target, data.target)
    # a worker building the family does not pay for importing scikit-learn
    code = ("import sys; from metapeft_dist.tasks.digits import load_classes; "
            "load_classes(); print('sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_digit_splits_are_disjoint_by_digit():
    digits = [set(SPLIT_DIGITS[s]) for s in ("train", "val", "test")]
    assert not (digits[0] & digits[1] or digits[0] & digits[2] or digits[1] & digits[2])
    assert set().union(*digits) == set(range(10))


@pytest.mark.parametrize("name", ["sinusoid", "gaussian", "digits"])
def test_task_is_a_function_of_its_key(name):
    fam = FAMS[name]
    key = TaskKey(3, "train", 17, 4)
    a, b = fam.sample(key, 2, 3), fam.sample(key, 2, 3)
    for x, y in zip(a.arrays(), b.arrays(), strict=True):
        np.testing.assert_array_equal(x, y)
    batch = sample_batch(fam, 3, "train", 17, [2, 3, 4, 5], 2, 3)
    np.testing.assert_array_equal(batch.support_x[2], a.support_x)  # index 4 at position 2
    other = fam.sample(TaskKey(3, "train", 18, 4), 2, 3)
    assert not np.array_equal(other.query_x, a.query_x)
    other_split = fam.sample(TaskKey(3, "test", 17, 4), 2, 3)
    assert not np.array_equal(other_split.query_x, a.query_x)


@pytest.mark.parametrize("name,ways", [("gaussian", 2), ("digits", 5)])
def test_classification_episode_shape(name, ways):
    fam = FAMS[name]
    ep = fam.sample(TaskKey(0, "train", 0, 0), 3, 4)
    shape = FAMILIES[name].input_shape
    assert ep.support_x.shape == (ways * 3, *shape) and ep.query_x.shape == (ways * 4, *shape)
    assert ep.support_x.dtype == np.float32 and ep.support_y.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(ep.support_y), [3] * ways)
    np.testing.assert_array_equal(np.bincount(ep.query_y), [4] * ways)


def test_digits_episode_uses_only_its_split_and_distinct_images():
    classes = load_classes()
    lookup = {}
    for cls, images in classes.items():
        for img in images:
            lookup.setdefault(img.tobytes(), set()).add(cls[0])
    for split in ("train", "val", "test"):
        for i in range(20):
            ep = FAMS["digits"].sample(TaskKey(0, split, 0, i), 2, 3)
            images = np.concatenate([ep.support_x, ep.query_x])
            digits = set().union(*(lookup[img.tobytes()] for img in images))
            assert digits <= set(SPLIT_DIGITS[split])
            # support and query never share an image within a class
            assert len({img.tobytes() for img in images}) == len(images) or split == "train"


def test_sinusoid_law():
    rng = np.random.default_rng(0)
    x, y, amplitude, phase = Sinusoid.draw(rng, 50)
    np.testing.assert_allclose(y, amplitude * np.sin(x - phase), rtol=1e-5, atol=1e-5)
    ep = FAMS["sinusoid"].sample(TaskKey(0, "test", 0, 0), 10, 100)
    assert ep.support_x.shape == (10, 1) and ep.query_y.shape == (100, 1)
    assert np.abs(ep.query_x).max() <= 5.0 and np.abs(ep.query_y).max() <= 5.0


def test_keyed_uniforms_are_a_function_of_the_key_and_the_draw():
    """The counter-based stream the sinusoid family draws from: a task's draws alone or
    in any batch, and any prefix of them, are the same bits; each part of the key
    changes them; they are uniform on [0, 1)."""
    batch = keyed_uniforms(3, "train", 17, [4, 9, 2], 30)
    assert batch.shape == (3, 30) and batch.dtype == np.float64
    np.testing.assert_array_equal(batch[1], keyed_uniforms(3, "train", 17, [9], 30)[0])
    np.testing.assert_array_equal(batch[:, :12], keyed_uniforms(3, "train", 17, [4, 9, 2], 12))
    for other in (keyed_uniforms(4, "train", 17, [4], 30), keyed_uniforms(3, "test", 17, [4], 30),
                  keyed_uniforms(3, "train", 18, [4], 30), keyed_uniforms(3, "train", 17, [5], 30)):
        assert not np.isin(other[0], batch[0]).any()
    u = keyed_uniforms(0, "train", 0, range(400), 250).ravel()  # 100,000 draws
    assert 0.0 <= u.min() and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.005 and abs(u.std() - np.sqrt(1 / 12)) < 0.005
    deciles = np.histogram(u, bins=10, range=(0, 1))[0] / u.size
    assert np.abs(deciles - 0.1).max() < 0.003  # 4+ standard errors of a decile's share
    with pytest.raises(ValueError, match="must be >= 0"):
        keyed_uniforms(0, "train", 0, [-1], 3)


def test_sinusoid_batch_is_its_tasks_drawn_alone():
    fam = FAMS["sinusoid"]
    batch = sample_batch(fam, 7, "val", 123, [0, 5, 24], 10, 15)
    for row, index in enumerate([0, 5, 24]):
        alone = fam.sample(TaskKey(7, "val", 123, index), 10, 15)
        for got, want in zip(batch.arrays(), alone.arrays(), strict=True):
            assert got.dtype == np.float32 and got.shape[1:] == want.shape
            np.testing.assert_array_equal(got[row], want)
    # the support set is the same whatever the number of query points
    more = fam.sample(TaskKey(7, "val", 123, 5), 10, 100)
    np.testing.assert_array_equal(more.support_x, batch.support_x[1])
    np.testing.assert_array_equal(more.support_y, batch.support_y[1])
    # keys from different iterations in one batch: each as drawn alone
    mixed = fam.sample_many([TaskKey(7, "val", 1, 0), TaskKey(7, "val", 2, 0)], 3, 2)
    alone = fam.sample(TaskKey(7, "val", 2, 0), 3, 2)
    np.testing.assert_array_equal(mixed.query_y[1], alone.query_y)


def test_gaussian_classes_differ_only_in_the_first_two_coordinates():
    rng = np.random.default_rng(1)
    for _ in range(20):
        means, stds = Gaussian.draw_task(rng)
        diff = means[1] - means[0]
        np.testing.assert_allclose(diff[2:], 0.0)
        assert 1.0 <= np.linalg.norm(diff[:2]) <= 4.0
        assert ((0.5 <= stds) & (stds <= 1.5)).all()
    # The sampled points follow their task's law.
    means, stds = Gaussian.draw_task(np.random.default_rng(2))
    x, y = Gaussian.draw_points(np.random.default_rng(3), means, stds, 20000)
    for c in (0, 1):
        np.testing.assert_allclose(x[y == c].mean(0), means[c], atol=0.05)
        np.testing.assert_allclose(x[y == c].std(0), stds[c], rtol=0.05)


def test_pretrain_batches_cover_all_meta_train_classes():
    x, y = FAMS["digits"].pretrain_batch(np.random.default_rng(0), 2000)
    assert set(y.tolist()) == set(range(FAMS["digits"].pretrain_outputs))
    assert x.shape == (2000, 8, 8, 1)


def test_shift_moves_pixels_and_fills_zeros():
    img = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
    down_right = shift(img, 1, 1)[0, :, :, 0]
    np.testing.assert_array_equal(down_right[1:, 1:], img[0, :3, :3, 0])
    assert (down_right[0] == 0).all() and (down_right[:, 0] == 0).all()
    np.testing.assert_array_equal(shift(img, 0, 0), img)
    up_left = shift(img, -1, -1)[0, :, :, 0]
    np.testing.assert_array_equal(up_left[:3, :3], img[0, 1:, 1:, 0])


def test_augmentation_shifts_whole_meta_train_classes_only():
    plain = FAMS["digits"]
    augmented = make_family(FamilySpec(name="digits", augment=True))
    for split in ("val", "test"):  # evaluation tasks are never augmented
        key = TaskKey(0, split, 0, 0)
        np.testing.assert_array_equal(augmented.sample(key, 2, 3).support_x,
                                      plain.sample(key, 2, 3).support_x)
    key = TaskKey(0, "train", 0, 0)
    a, b = augmented.sample(key, 3, 4), augmented.sample(key, 3, 4)
    np.testing.assert_array_equal(a.query_x, b.query_x)  # still a function of the key
    ref = plain.sample(key, 3, 4)
    # Each class is its plain images moved by one offset shared by support and query.
    for c in range(5):
        images = np.concatenate([ref.support_x[ref.support_y == c], ref.query_x[ref.query_y == c]])
        moved = np.concatenate([a.support_x[a.support_y == c], a.query_x[a.query_y == c]])
        matches = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                   if np.array_equal(shift(images, dy, dx), moved)]
        assert len(matches) >= 1
