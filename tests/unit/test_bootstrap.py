"""Bootstrap data of every kind: image folders, text files, .npz archives and the built-in sets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from controller.prepare.bootstrap import BootstrapOptions, load_bootstrap
from early_exit.manifest import TensorSpec
from tests.unit.test_sources import word_tokenizer
from triton_backend.raw_inputs import TextEncoder, decode_image

SIZE = (12, 10)  # height, width
LINES = ["a very good film", "the plot is dull", "not bad", "fine", "the film is great", "awful plot", "very very dull"]


def _save_image(path: Path, height: int, width: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def encoder() -> TextEncoder:
    return TextEncoder(word_tokenizer("bert"), max_length=8, pad_id=0)


def test_image_folder_is_decoded_like_the_served_entry_and_bad_files_are_skipped(tmp_path: Path) -> None:
    _save_image(tmp_path / "cats" / "a.png", 12, 10, 0)
    _save_image(tmp_path / "cats" / "deep" / "b.JPG", 40, 30, 1)  # resized; suffixes in any case
    _save_image(tmp_path / "dogs" / "c.jpeg", 5, 7, 2)
    (tmp_path / "dogs" / "broken.jpg").write_bytes(b"not an image")
    (tmp_path / "notes.txt").write_text("not an image either, and not a .jpg/.png: ignored")

    bootstrap = load_bootstrap(str(tmp_path), BootstrapOptions(image_size=SIZE))

    assert bootstrap.inputs == (TensorSpec("IMAGE", "uint8", (12, 10, 3)),) and bootstrap.primary == "IMAGE"
    files = [tmp_path / "cats" / "a.png", tmp_path / "cats" / "deep" / "b.JPG", tmp_path / "dogs" / "c.jpeg"]
    expected = np.stack([decode_image(f.read_bytes(), *SIZE) for f in files])
    np.testing.assert_array_equal(bootstrap.arrays["IMAGE"], expected)


def test_image_folder_needs_a_size_and_decodable_images(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no .jpeg/.jpg/.png files"):
        load_bootstrap(str(tmp_path), BootstrapOptions(image_size=SIZE))
    _save_image(tmp_path / "a.png", 4, 4, 0)
    with pytest.raises(SystemExit, match="--image-size H W"):
        load_bootstrap(str(tmp_path), BootstrapOptions())
    (tmp_path / "b.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(SystemExit, match="1 decodable images, need at least 2"):
        load_bootstrap(str(tmp_path), BootstrapOptions(image_size=SIZE))


def test_own_inputs_are_drawn_in_a_seeded_random_order(tmp_path: Path) -> None:
    for index in range(30):
        _save_image(tmp_path / f"{index:02d}.png", 2, 2, index)
    images = [np.asarray(Image.open(tmp_path / f"{i:02d}.png")) for i in range(30)]

    first = load_bootstrap(str(tmp_path), BootstrapOptions(limit=12, image_size=(2, 2))).arrays["IMAGE"]
    again = load_bootstrap(str(tmp_path), BootstrapOptions(limit=12, image_size=(2, 2))).arrays["IMAGE"]

    np.testing.assert_array_equal(first, again)
    drawn = [next(i for i, image in enumerate(images) if np.array_equal(image, row)) for row in first]
    assert len(set(drawn)) == 12 and drawn != list(range(12))


def test_txt_has_one_input_per_line(tmp_path: Path, encoder: TextEncoder) -> None:
    path = tmp_path / "inputs.txt"
    path.write_text("\n".join(LINES[:3]) + "\n\n   \n" + "\n".join(LINES[3:]) + "\n", encoding="utf-8")

    bootstrap = load_bootstrap(str(path), BootstrapOptions(), encoder)

    assert bootstrap.inputs == (TensorSpec("INPUT_IDS", "int64", (8,)), TensorSpec("ATTENTION_MASK", "int64", (8,)))
    assert bootstrap.primary == "INPUT_IDS"
    expected = encoder.encode(LINES)
    assert sorted(map(tuple, bootstrap.arrays["INPUT_IDS"])) == sorted(map(tuple, expected["INPUT_IDS"]))
    assert bootstrap.arrays["ATTENTION_MASK"].sum() == expected["ATTENTION_MASK"].sum()


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_table_reads_the_text_column(tmp_path: Path, encoder: TextEncoder, suffix: str) -> None:
    delimiter = "," if suffix == ".csv" else "\t"
    path = tmp_path / f"inputs{suffix}"
    rows = [f'{i}{delimiter}"{line}, really"' for i, line in enumerate(LINES)]
    path.write_text(f"id{delimiter}review\n" + "\n".join(rows), encoding="utf-8")

    bootstrap = load_bootstrap(str(path), BootstrapOptions(text_column="review"), encoder)

    expected = encoder.encode([f"{line}, really" for line in LINES])["INPUT_IDS"]
    assert sorted(map(tuple, bootstrap.arrays["INPUT_IDS"])) == sorted(map(tuple, expected))
    with pytest.raises(SystemExit, match=r"'text' is not one of its columns \['id', 'review'\]"):
        load_bootstrap(str(path), BootstrapOptions(text_column="text"), encoder)
    with pytest.raises(SystemExit, match="None is not one of its columns"):
        load_bootstrap(str(path), BootstrapOptions(), encoder)


def test_one_column_table_needs_no_column_name(tmp_path: Path, encoder: TextEncoder) -> None:
    path = tmp_path / "inputs.csv"
    path.write_text("sentence\n" + "\n".join(LINES), encoding="utf-8")
    assert len(load_bootstrap(str(path), BootstrapOptions(), encoder)) == len(LINES)


def test_jsonl_reads_the_text_key_and_names_the_bad_line(tmp_path: Path, encoder: TextEncoder) -> None:
    path = tmp_path / "inputs.jsonl"
    path.write_text("\n".join(json.dumps({"text": line, "id": i}) for i, line in enumerate(LINES)), encoding="utf-8")
    assert len(load_bootstrap(str(path), BootstrapOptions(text_column="text"), encoder)) == len(LINES)
    with pytest.raises(SystemExit, match="give --text-column"):
        load_bootstrap(str(path), BootstrapOptions(), encoder)
    with pytest.raises(SystemExit, match="line 1: no text under key 'review'"):
        load_bootstrap(str(path), BootstrapOptions(text_column="review"), encoder)
    path.write_text(json.dumps({"text": "fine"}) + "\n[1, 2]\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="line 2: not a JSON object"):
        load_bootstrap(str(path), BootstrapOptions(text_column="text"), encoder)


def test_text_needs_the_model_tokenizer_and_utf8(tmp_path: Path, encoder: TextEncoder) -> None:
    path = tmp_path / "inputs.txt"
    path.write_text("\n".join(LINES), encoding="utf-8")
    with pytest.raises(SystemExit, match="brings no tokenizer"):
        load_bootstrap(str(path), BootstrapOptions())
    path.write_bytes(b"\xff\xfe not utf-8\n")
    with pytest.raises(SystemExit, match="not UTF-8"):
        load_bootstrap(str(path), BootstrapOptions(), encoder)
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="no inputs"):
        load_bootstrap(str(path), BootstrapOptions(), encoder)


def test_npz_arrays_match_the_model_inputs_by_name_in_forward_order(tmp_path: Path) -> None:
    path = tmp_path / "inputs.npz"
    mask = np.ones((20, 6), dtype=np.int64)
    ids = np.arange(120, dtype=np.int64).reshape(20, 6)
    np.savez(path, ATTENTION_MASK=mask, input_ids=ids)

    bootstrap = load_bootstrap(str(path), BootstrapOptions(), input_names=["input_ids", "attention_mask"])

    assert [spec.name for spec in bootstrap.inputs] == ["INPUT_IDS", "ATTENTION_MASK"]
    assert bootstrap.primary == "INPUT_IDS" and bootstrap.inputs[0] == TensorSpec("INPUT_IDS", "int64", (6,))
    assert sorted(bootstrap.arrays["INPUT_IDS"][:, 0].tolist()) == ids[:, 0].tolist()


def test_npz_defects_are_named(tmp_path: Path) -> None:
    path = tmp_path / "inputs.npz"
    np.savez(path, pixels=np.zeros((4, 2), np.float32))
    with pytest.raises(SystemExit, match=r"arrays \['pixels'\] must be named like the model's inputs \['image'\]"):
        load_bootstrap(str(path), BootstrapOptions(), input_names=["image"])
    np.savez(path, a=np.zeros((4, 2), np.float32), b=np.zeros((5, 2), np.float32))
    with pytest.raises(SystemExit, match="same number of samples"):
        load_bootstrap(str(path), BootstrapOptions(), input_names=["a", "b"])
    np.savez(path, x=np.zeros((4, 2), np.float64))
    with pytest.raises(SystemExit, match="array x is float64"):
        load_bootstrap(str(path), BootstrapOptions(), input_names=["x"])


def test_npz_for_a_model_taking_positional_inputs_keeps_the_archive_order(tmp_path: Path) -> None:
    path = tmp_path / "inputs.npz"
    np.savez(path, image=np.zeros((4, 3, 8, 8), np.float32), scale=np.ones((4, 1), np.float32))
    bootstrap = load_bootstrap(str(path), BootstrapOptions(), input_names=None)
    assert [spec.name for spec in bootstrap.inputs] == ["IMAGE", "SCALE"]


def test_built_in_sets_use_their_leading_share() -> None:
    from model_zoo.datasets import load_digits

    bootstrap = load_bootstrap("digits", BootstrapOptions())
    train = load_digits("train").images
    assert len(bootstrap) == round(len(train) * 0.1)
    np.testing.assert_array_equal(bootstrap.arrays["IMAGE"], train[: len(bootstrap)])
    assert len(load_bootstrap("digits", BootstrapOptions(fraction=0.5, limit=40))) == 40


def test_unknown_data_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="not a built-in data set"):
        load_bootstrap(str(tmp_path / "missing"), BootstrapOptions())
    (tmp_path / "inputs.parquet").write_bytes(b"PAR1")
    with pytest.raises(SystemExit, match="unsupported file type '.parquet'"):
        load_bootstrap(str(tmp_path / "inputs.parquet"), BootstrapOptions())
    with pytest.raises(SystemExit, match="--bootstrap-fraction"):
        BootstrapOptions(fraction=1.5)
