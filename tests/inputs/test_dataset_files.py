"""Dataset files (issue 22, rows 4, 5, 6): a damaged or inconsistent .npz is one clear error naming the file (and
the array) and what is wrong, raised by ``load_dataset`` and, through ``fastdp train``, as a parser error before
the first training step (no traceback, no training thrown away)."""
import os

import numpy as np
import pytest

import fastdp.cli as cli
from fastdp.data import load_dataset

N_TRAIN, N_TEST = 40, 20


def arrays(**override):
    rng = np.random.default_rng(0)
    a = {"x_train": rng.integers(0, 256, (N_TRAIN, 28, 28), dtype=np.uint8), "y_train": np.arange(N_TRAIN) % 10,
         "x_test": rng.integers(0, 256, (N_TEST, 28, 28), dtype=np.uint8), "y_test": np.arange(N_TEST) % 10}
    a.update(override)
    return {k: v for k, v in a.items() if v is not None}


def write(tmp_path, **override):
    path = tmp_path / "mnist.npz"
    np.savez(path, **arrays(**override))
    return path


@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if a training step would start (every check must come before it)."""
    def refuse(*args, **kwargs):
        raise AssertionError("training started before the data were checked")
    monkeypatch.setattr(cli, "_train_epoch", refuse)


def cli_error(tmp_path, capsys, *extra):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path), "--epochs", "1", "--noise-multiplier",
                  "1", "--device", "cpu", "--no-progress", *extra])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "fastdp train: error:" in err and "Traceback" not in err, err
    return err


def test_a_valid_file_loads(tmp_path):
    write(tmp_path)
    train, test, meta = load_dataset("mnist", data_dir=str(tmp_path))
    assert len(train) == N_TRAIN and len(test) == N_TEST and meta["image_shape"] == (1, 28, 28)


# ------------------------------------------------------------------------------------------------ row 6
def _truncated(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _byte_flipped(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside x_train's pixels: the zip member's CRC-32 no longer matches
    path.write_bytes(bytes(data))


def _garbage(path):
    path.write_bytes(os.urandom(3000))


def _empty(path):
    path.write_bytes(b"")


def _npy_not_npz(path):
    with open(path, "wb") as f:
        np.save(f, np.zeros(3))


def _pickled(path):
    np.savez(path, **arrays(y_train=np.array([object()] * N_TRAIN, dtype=object)))


DAMAGE = {"truncated": (_truncated, "not a readable .npz"), "byte-flipped": (_byte_flipped, "'x_train' cannot be read"),
          "garbage": (_garbage, "not a readable .npz"), "empty": (_empty, "not a readable .npz"),
          "npy": (_npy_not_npz, "not an .npz archive"), "pickled-objects": (_pickled, "'y_train' cannot be read")}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_archives_are_one_clear_error_naming_the_file(tmp_path, capsys, no_training, damage):
    path = write(tmp_path)
    make, message = DAMAGE[damage]
    make(path)
    with pytest.raises(ValueError, match=message) as exc:
        load_dataset("mnist", data_dir=str(tmp_path))
    assert str(path) in str(exc.value)
    err = cli_error(tmp_path, capsys)
    assert str(path) in err and message in err


BAD_CONTENT = {
    "empty train split": (dict(x_train=np.zeros((0, 28, 28), np.uint8), y_train=np.zeros(0, np.int64)),
                          "x_train is empty"),
    "empty test split": (dict(x_test=np.zeros((0, 28, 28), np.uint8), y_test=np.zeros(0, np.int64)),
                         "x_test is empty"),
    "2-D labels": (dict(y_train=np.zeros((N_TRAIN, 10), np.int64)), "y_train must be one label per image"),
    "string labels": (dict(y_test=np.array([str(i % 10) for i in range(N_TEST)])), "y_test must hold integer"),
    "bool labels": (dict(y_test=np.ones(N_TEST, bool)), "y_test must hold integer"),
    "label count": (dict(y_train=np.arange(N_TRAIN - 1) % 10), "y_train has 39 labels for 40 images"),
    "float images": (dict(x_train=np.zeros((N_TRAIN, 28, 28), np.float32)), "x_train must be uint8"),
    "4-D images": (dict(x_test=np.zeros((N_TEST, 28, 28, 1), np.uint8)), "x_test must be images"),
    "zero-size images": (dict(x_train=np.zeros((N_TRAIN, 0, 28), np.uint8)), "x_train has images of size 0x28"),
    "missing array": (dict(y_test=None), "lacks the arrays \\['y_test'\\]"),
}


@pytest.mark.parametrize("case", list(BAD_CONTENT))
def test_bad_contents_are_one_clear_error_naming_file_and_array(tmp_path, capsys, no_training, case):
    override, message = BAD_CONTENT[case]
    path = write(tmp_path, **override)
    with pytest.raises(ValueError, match=message) as exc:
        load_dataset("mnist", data_dir=str(tmp_path))
    assert str(path) in str(exc.value)
    assert str(path) in cli_error(tmp_path, capsys)


# ------------------------------------------------------------------------------------------------ row 4
@pytest.mark.parametrize("key,labels,message", [
    ("y_test", np.arange(N_TEST) % 10 + 10, "y_test holds labels 10..19, outside 0..9"),
    ("y_train", np.arange(N_TRAIN) % 10 - 1, "y_train holds labels -1..8, outside 0..9"),
    ("y_test", np.arange(N_TEST) % 10 + 0.7, "y_test must hold integer class labels"),
    ("y_train", (np.arange(N_TRAIN) % 10 + 0.7).astype(np.float32), "y_train must hold integer class labels"),
])
def test_labels_outside_the_classes_or_not_integers_are_refused(tmp_path, capsys, no_training, key, labels, message):
    """Test labels 10..19 gave accuracy 0.0000 and float labels were truncated and trained on."""
    path = write(tmp_path, **{key: labels})
    with pytest.raises(ValueError, match=message) as exc:
        load_dataset("mnist", data_dir=str(tmp_path))
    assert str(path) in str(exc.value)
    err = cli_error(tmp_path, capsys)
    assert str(path) in err and key in err


# ------------------------------------------------------------------------------------------------ row 5
def test_test_images_of_another_shape_are_refused_before_training(tmp_path, capsys, no_training):
    """Trained the whole run, then crashed in evaluation."""
    path = write(tmp_path, x_test=np.zeros((N_TEST, 14, 14), np.uint8))
    with pytest.raises(ValueError, match="x_test has images of size 14x14, x_train of 28x28"):
        load_dataset("mnist", data_dir=str(tmp_path))
    assert str(path) in cli_error(tmp_path, capsys)


@pytest.mark.parametrize("shape", [(28, 20), (3, 3)])
def test_image_sizes_the_cnn_cannot_take_are_refused_before_training(tmp_path, capsys, no_training, shape):
    write(tmp_path, x_train=np.zeros((N_TRAIN, *shape), np.uint8), x_test=np.zeros((N_TEST, *shape), np.uint8))
    load_dataset("mnist", data_dir=str(tmp_path))  # the data are consistent: the model is what cannot take them
    err = cli_error(tmp_path, capsys)
    assert "--model cnn needs square images of at least 4x4 pixels" in err and f"{shape[0]}x{shape[1]}" in err


def test_odd_but_usable_image_sizes_train(tmp_path):
    """27x27 (not divisible by 4) fits SmallCNN (floor pooling); 28x20 fits the MLP."""
    write(tmp_path, x_train=np.zeros((N_TRAIN, 27, 27), np.uint8), x_test=np.zeros((N_TEST, 27, 27), np.uint8))
    r = cli.main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path), "--epochs", "1", "--noise-multiplier",
                  "1", "--device", "cpu", "--no-progress", "--reproducible", "--batch-size", "8"])
    assert r["steps"] > 0
    write(tmp_path, x_train=np.zeros((N_TRAIN, 28, 20), np.uint8), x_test=np.zeros((N_TEST, 28, 20), np.uint8))
    r = cli.main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path), "--epochs", "1", "--noise-multiplier",
                  "1", "--device", "cpu", "--no-progress", "--reproducible", "--batch-size", "8", "--model", "mlp"])
    assert r["steps"] > 0
