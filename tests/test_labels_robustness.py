"""labels.txt that used to lose a row or end in a traceback (issue 14): each case's exact message, through the reader,
`load_source` / `prepare_data`, and for a few through `python -m attrclf train` (exit code 2, one line, no traceback).

Every data set is a few 8x8 images. The header is decided by evidence (`first_row_is_header`): a first cell that is a
file in images/ makes the row data, an uncertain first row stops with --header / --no-header named.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from attrclf.config import TrainConfig, parse_args
from attrclf.labels import compute_pos_weight, read_labels_file, split_row, training_counts
from attrclf.sources import load_source, prepare_data

from .conftest import REPO, error_of

IMAGES = ("a.png", "b.png", "c.png")


def dataset(tmp_path: Path, text: str | bytes, images=IMAGES, folders=(), name="data") -> Path:
    """tmp_path/name/labels.txt holding `text` (str: written as UTF-8) and an 8x8 image per name in images/."""
    root = tmp_path / name
    (root / "images").mkdir(parents=True)
    for n, image in enumerate(images):
        Image.new("RGB", (8, 8), (40 * n, 200, 90)).save(root / "images" / image, format="PNG")
    for folder in folders:
        (root / "images" / folder).mkdir()
    (root / "labels.txt").write_bytes(text if isinstance(text, bytes) else text.encode())
    return root


def uncertain(row: str, reason: str) -> str:
    """The message of an uncertain first row."""
    return (f"labels.txt line 1: cannot tell whether the first row '{row}' is a header or an image's labels "
            f"({reason}); pass --header if it names the attributes, --no-header if it is data")


# ---------------------------------------------------------------- header or data: by evidence


def test_headerless_first_row_with_a_typo_is_data_and_the_typo_is_reported(tmp_path):
    """It used to become the header (attributes '1', 'O', 'NA'), a.png dropped, exit 0."""
    root = dataset(tmp_path, "a.png 1 O NA\nb.png 0 1 1\nc.png 1 1 0\n")
    assert error_of(lambda: load_source(root)) == "labels.txt line 1: value 'O' for attribute 'Attr2' is not 0, 1 or NA"


@pytest.mark.parametrize("value, attribute", [("?", "Attr2"), ("yes", "Attr1")])
def test_headerless_first_row_with_an_invalid_value(tmp_path, value, attribute):
    """It used to say "attribute name '1' appears twice in the header" of a file without a header."""
    row = "a.png 1 ? NA" if value == "?" else "a.png yes 1 1"
    root = dataset(tmp_path, f"{row}\nb.png 0 1 1\n")
    assert error_of(lambda: load_source(root)) == (
        f"labels.txt line 1: value '{value}' for attribute '{attribute}' is not 0, 1 or NA")


def test_header_of_numbers_is_uncertain_and_header_forces_it(tmp_path):
    """`image 0 1` used to be read as data ("image 'image' not in images/")."""
    root = dataset(tmp_path, "image 0 1\na.png 1 0\nb.png 0 1\nc.png 1 NA\n")
    images = root / "images"
    assert error_of(lambda: load_source(root)) == uncertain(
        "image 0 1", f"'image' is not in '{images}', and its other values are all 1, 0 or NA")
    source = load_source(root, header=True)
    assert source.label_names == ["0", "1"]
    assert source.splits["train"]["image_name"] == list(IMAGES)
    assert source.splits["train"]["labels"] == [[1, 0], [0, 1], [1, None]]
    assert error_of(lambda: load_source(root, header=False)).startswith(
        f"1 of 4 images listed in labels.txt are not in '{images}': image")


@pytest.mark.parametrize("first, reason", [
    ("photo 1 hat", "'photo' is not in '{images}', and some of its values are labels (1) and some not"),
    ("zz.png yes no", "'zz.png' looks like an image name but is not in '{images}', and none of its values is 1, 0 "
                      "or NA"),
])
def test_other_uncertain_first_rows(tmp_path, first, reason):
    root = dataset(tmp_path, f"{first}\na.png 1 0\nb.png 0 1\n")
    assert error_of(lambda: load_source(root)) == uncertain(first, reason.format(images=root / "images"))


def test_first_row_naming_an_image_that_is_missing_is_data_not_a_header(tmp_path):
    """An image-like first cell with label values is a row: its missing image is reported, the row is not lost."""
    root = dataset(tmp_path, "zz.png 1 0\na.png 1 0\nb.png 0 1\n")
    assert error_of(lambda: load_source(root)).startswith(
        f"1 of 3 images listed in labels.txt are not in '{root / 'images'}': zz.png\n")


def test_repeated_label_values_cannot_be_a_header(tmp_path):
    """`photo 1 1`: attribute names are unique, so this is a row (for an image that is missing), not a header."""
    root = dataset(tmp_path, "photo 1 1\na.png 1 0\nb.png 0 1\n")
    assert error_of(lambda: load_source(root)).startswith("1 of 3 images listed in labels.txt are not in")


def test_first_cell_that_is_an_image_without_extension_makes_data(tmp_path):
    """An image file named `0001` (no extension) in images/: its row is data though it reads like `image 0 1`."""
    root = dataset(tmp_path, "0001 0 1\na.png 1 0\n", images=("0001", "a.png"))
    source = load_source(root)
    assert source.label_names == ["Attr1", "Attr2"] and source.splits["train"]["image_name"] == ["0001", "a.png"]


@pytest.mark.parametrize("text, names", [
    ("image smile hat\na.png 1 0\nb.png 0 1\n", ["smile", "hat"]),  # the usual header
    ("smile hat\na.png 1 0\nb.png 0 1\n", ["smile", "hat"]),  # names only, no image column
    ("a.png 1 0\nb.png 0 1\n", ["Attr1", "Attr2"]),  # no header
    ('"image name" "big hat" smile\r\na.png 1 0\r\nb.png 0 1\r\n', ["big hat", "smile"]),  # quoted names, CRLF
])
def test_headers_that_keep_working(tmp_path, text, names):
    root = dataset(tmp_path, text)
    source = load_source(root)
    assert source.label_names == names
    assert source.splits["train"]["image_name"] == ["a.png", "b.png"]
    assert source.splits["train"]["labels"] == [[1, 0], [0, 1]]


def test_no_header_reads_the_first_row_as_data(tmp_path):
    root = dataset(tmp_path, "image smile hat\na.png 1 0\n")
    assert error_of(lambda: load_source(root, header=False)) == (
        "labels.txt line 1: value 'smile' for attribute 'Attr1' is not 0, 1 or NA")


# ---------------------------------------------------------------- image names with spaces


def test_quoted_image_names_with_spaces(tmp_path):
    root = dataset(tmp_path, '"my photo.jpg" 1 0\nb.png 0 "NA"\n', images=("my photo.jpg", "b.png"))
    source = load_source(root)
    assert source.splits["train"]["image_name"] == ["my photo.jpg", "b.png"]
    assert source.splits["train"]["labels"] == [[1, 0], [0, None]]
    assert split_row(r'"C:\data x\a.png" 1', "f") == [r"C:\data x\a.png", "1"]  # no escapes: Windows paths survive


@pytest.mark.parametrize("text, line", [("a.png 1 0\nb.png 0 1\nmy photo.jpg 1 0\n", 3),
                                        ("my photo.jpg 1 0\na.png 1 0\nb.png 0 1\n", 1)])
def test_unquoted_name_with_a_space_says_to_quote_it(tmp_path, text, line):
    """It used to say "value '00000.png' for attribute 'image' is not 0, 1 or NA" (the wrong column)."""
    root = dataset(tmp_path, text, images=("a.png", "b.png", "my photo.jpg"))
    assert error_of(lambda: load_source(root)) == (
        f"labels.txt line {line}: 'my' and 'photo.jpg' look like one image name with a space; quote it: "
        f'"my photo.jpg"')


def test_name_with_two_spaces_and_unclosed_quote(tmp_path):
    root = dataset(tmp_path, "a.png 1 0\nmy old photo.png 0 1\n", images=("a.png", "my old photo.png"))
    assert error_of(lambda: load_source(root)) == (
        "labels.txt line 2: 'my', 'old' and 'photo.png' look like one image name with a space; quote it: "
        '"my old photo.png"')
    root = dataset(tmp_path, 'a.png 1 0\n"b.png 0 1\n', name="unclosed")
    assert error_of(lambda: load_source(root)) == 'labels.txt line 2: a " opens a quoted name that is not closed on ' \
                                                  'this line'


def test_a_row_with_one_value_too_many_is_still_a_ragged_row(tmp_path):
    """No image is named by its first cells joined: the usual message. Most rows set the width (ties: the first)."""
    message = ("labels.txt line 2: 3 values, expected 2 (one per attribute after the image name, separated by spaces "
               "or tabs; quote a name with spaces)")
    assert error_of(lambda: load_source(dataset(tmp_path, "a.png 1 0\nb.png 0 1 1\n"))) == message
    assert error_of(lambda: load_source(dataset(tmp_path, "a.png 1 0\nb.png 0 1 1\nc.png 1 1\n", name="3"))) == message


# ---------------------------------------------------------------- encodings


def test_utf8_with_and_without_bom(tmp_path):
    text = "image smile café\na.png 1 0\nb.png 0 1\n"
    for name, data in (("plain", text.encode()), ("bom", b"\xef\xbb\xbf" + text.encode())):
        assert load_source(dataset(tmp_path, data, name=name)).label_names == ["smile", "café"]


def test_latin1_is_one_line_and_labels_encoding_reads_it(tmp_path):
    """It used to be a UnicodeDecodeError traceback."""
    root = dataset(tmp_path, "a.png 1 0\nb.png 0 1\ncaf\xe9.png 1 1\n".encode("latin-1"),
                   images=("a.png", "b.png", "caf\xe9.png"))
    assert error_of(lambda: load_source(root)) == (
        "labels.txt is not UTF-8 (byte 0xe9 at offset 23, line 3); if it is Latin-1, pass --labels-encoding latin-1 "
        "(or the file's encoding), or save it as UTF-8")
    source = load_source(root, labels_encoding="latin-1")
    assert source.splits["train"]["image_name"] == ["a.png", "b.png", "café.png"]
    assert error_of(lambda: load_source(root, labels_encoding="ascii")) == (
        "labels.txt is not valid ascii (byte 0xe9 at offset 23, line 3); check --labels-encoding")
    assert error_of(lambda: load_source(root, labels_encoding="klingon")) == (
        "--labels-encoding 'klingon': not an encoding Python knows (for example utf-8, latin-1, cp1252, utf-16)")


@pytest.mark.parametrize("name, text", [
    ("metadata.csv", "file_name,smile\na.png,1\ncaf\xe9.png,0\n"),
    ("metadata.jsonl", '{"file_name": "a.png", "smile": 1}\n{"file_name": "caf\xe9.png", "smile": 0}\n'),
])
def test_image_folder_metadata_in_latin1_is_one_line_too(tmp_path, name, text):
    root = tmp_path / "folder"
    root.mkdir()
    for image in ("a.png", "caf\xe9.png"):
        Image.new("RGB", (8, 8)).save(root / image, format="PNG")
    (root / name).write_bytes(text.encode("latin-1"))
    data = text.encode("latin-1")
    offset = data.index(b"\xe9")
    line = data.count(b"\n", 0, offset) + 1
    assert error_of(lambda: load_source(root)) == (
        f"{name} is not UTF-8 (byte 0xe9 at offset {offset}, line {line}); if it is Latin-1, pass --labels-encoding "
        f"latin-1 (or the file's encoding), or save it as UTF-8")
    assert load_source(root, labels_encoding="latin-1").splits["train"]["image_name"] == ["a.png", "café.png"]


def test_binary_and_utf16_files(tmp_path):
    png = dataset(tmp_path, b"", name="png")
    Image.new("RGB", (8, 8)).save(png / "labels.txt", format="PNG")
    assert error_of(lambda: load_source(png)) == (
        "labels.txt looks binary (a NUL byte at offset 8), not a text file of labels; check --labels / --data")
    utf16 = dataset(tmp_path, "image x y\na.png 1 0\nb.png 0 1\n".encode("utf-16"), name="utf16")
    assert error_of(lambda: load_source(utf16)) == (
        "labels.txt is UTF-16 (it starts with a UTF-16 byte-order mark), not UTF-8; save it as UTF-8 or pass "
        "--labels-encoding utf-16")
    assert load_source(utf16, labels_encoding="utf-16").label_names == ["x", "y"]


def test_labels_path_that_is_a_directory(tmp_path):
    root = dataset(tmp_path, "a.png 1 0\n")
    (root / "folder").mkdir()
    assert error_of(lambda: read_labels_file(root / "folder")) == (
        f"labels file '{root / 'folder'}' is a directory; pass the labels file itself with --labels FILE")


# ---------------------------------------------------------------- item 5: a directory named like an image, one warning


def test_an_image_path_that_is_a_directory(tmp_path):
    """It used to say "not in images/"."""
    root = dataset(tmp_path, "a.png 1 0\nd.png 0 1\nb.png 1 1\n", folders=("d.png",))
    assert error_of(lambda: load_source(root)) == (
        f"labels.txt line 2: 'd.png' is a directory in '{root / 'images'}', not an image file; list image files only")


def test_an_attribute_without_known_labels_is_warned_about_once(tmp_path):
    """prepare_data no longer repeats compute_pos_weight's warning (both were printed: the same line twice)."""
    root = dataset(tmp_path, "img a b\n" + "".join(f"i{n}.png {n % 2} NA\n" for n in range(6)),
                   images=[f"i{n}.png" for n in range(6)])
    data = prepare_data(root, val_fraction=0.34)
    assert data.warnings == []
    _, warnings = compute_pos_weight(training_counts(data.train["labels"], 2), data.label_names)
    assert warnings == ["attribute 'b' has no known labels in the training split; pos_weight set to 1"]


# ---------------------------------------------------------------- flags: training and evaluate


@pytest.fixture
def fresh_accelerate_state():
    """Training builds its own Accelerator (bf16 where the CPU has it): forget any other test's state, before and
    after (accelerate's own tests reset it so)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_flags_reach_the_reader(tmp_path, fresh_accelerate_state):
    from accelerate import Accelerator

    from attrclf.engine import load_training_data

    cfg = parse_args(["--data", "x", "--header", "--labels-encoding", "latin-1"])
    assert (cfg.header, cfg.labels_encoding) == (True, "latin-1")
    assert parse_args(["--no-header"]).header is False and parse_args([]).header is None
    root = dataset(tmp_path, "image 0 1\na.png 1 0\nb.png 0 1\nc.png 1 NA\n".encode("latin-1"))
    data = load_training_data(TrainConfig(data=str(root), header=True, labels_encoding="latin-1"),
                              Accelerator())
    assert data.label_names == ["0", "1"] and len(data.train) + len(data.validation) == 3


def test_evaluate_takes_header_flags(tmp_path, tiny_model_factory, capsys):
    from attrclf.evaluate import main

    model = tiny_model_factory(("0", "1"))
    model.save_pretrained(tmp_path / "model")
    root = dataset(tmp_path, "image 0 1\na.png 1 0\nb.png 0 1\nc.png 1 NA\n")
    argv = ["--model", str(tmp_path / "model"), "--data", str(root), "--device", "cpu"]
    assert main(argv) == 2
    assert capsys.readouterr().err == "error: " + uncertain(
        "image 0 1", f"'image' is not in '{root / 'images'}', and its other values are all 1, 0 or NA") + "\n"
    assert main([*argv, "--header"]) == 0
    assert "3 images" in capsys.readouterr().out


# ---------------------------------------------------------------- through the command line


CLI_CASES = {
    "typo": ("a.png 1 O NA\nb.png 0 1 1\nc.png 1 1 0\n", IMAGES, (),
             "labels.txt line 1: value 'O' for attribute 'Attr2' is not 0, 1 or NA"),
    "spaces": ("a.png 1 0\nb.png 0 1\nmy photo.jpg 1 0\n", ("a.png", "b.png", "my photo.jpg"), (),
               "labels.txt line 3: 'my' and 'photo.jpg' look like one image name with a space; quote it: "
               '"my photo.jpg"'),
    "latin1": ("a.png 1 0\nb.png 0 1\ncaf\xe9.png 1 1\n".encode("latin-1"), IMAGES, (),
               "labels.txt is not UTF-8 (byte 0xe9 at offset 23, line 3); if it is Latin-1, pass --labels-encoding "
               "latin-1 (or the file's encoding), or save it as UTF-8"),
    "directory": ("a.png 1 0\nd.png 0 1\nb.png 1 1\n", IMAGES, ("d.png",),
                  "labels.txt line 2: 'd.png' is a directory in '{images}', not an image file; list image files only"),
    "ragged": ("img a b c d\n" + "".join(f"a{n}.png 1 0 1 0\n" for n in range(15)) + "a15.png 1 0 1\n",
               [f"a{n}.png" for n in range(16)], (),
               "labels.txt line 17: 3 values, expected 4 (one per attribute after the image name, separated by "
               "spaces or tabs; quote a name with spaces)"),
    "bad value": ("img Attr1 Attr2 Attr3\na.png 1 0 1\nb.png 1 0 x\n", IMAGES, (),
                  "labels.txt line 3: value 'x' for attribute 'Attr3' is not 0, 1 or NA"),
}


def cli_case(tmp_path: Path, n: int, case: str) -> tuple[Path, list[str]]:
    """The data folder of CLI_CASES[case] and the `attrclf train` flags that read it."""
    text, images, folders, _ = CLI_CASES[case]
    root = dataset(tmp_path, text, images=images, folders=folders, name=f"case{n}")
    return root, ["train", "--data", str(root), "--backbone", "test_resnet", "--no-pretrained",
                  "--output-dir", str(tmp_path / f"out{n}")]


def test_cli_cases_in_process(tmp_path, capsys, fresh_accelerate_state):
    """`attrclf train` (cli.main, in this process) for each case: exit code 2 and `error: ...` on one line."""
    from attrclf.cli import main

    for n, case in enumerate(CLI_CASES):
        root, argv = cli_case(tmp_path, n, case)
        assert main(argv) == 2, case
        expected = CLI_CASES[case][3].format(images=root / "images")
        assert capsys.readouterr().err == f"error: {expected}\n", case
        assert not (tmp_path / f"out{n}").exists()


@pytest.mark.slow
def test_cli_cases_are_one_line_exit_2_no_traceback(tmp_path):
    """`python -m attrclf train --data DIR` for each case, run side by side: exit code 2, `error: ...` and nothing
    else on stderr (about 15 s alone, minutes on a loaded machine: six interpreters import torch)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "ATTRCLF_CACHE": str(tmp_path / "cache")}
    runs = {}
    for n, case in enumerate(CLI_CASES):
        root, argv = cli_case(tmp_path, n, case)
        runs[case] = (n, root, subprocess.Popen([sys.executable, "-m", "attrclf", *argv], stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path))
    for case, (n, root, process) in runs.items():
        _, stderr = process.communicate(timeout=600)
        expected = CLI_CASES[case][3].format(images=root / "images")
        assert (process.returncode, stderr) == (2, f"error: {expected}\n"), case
        assert "Traceback" not in stderr and not (tmp_path / f"out{n}").exists()


@pytest.mark.slow
def test_cli_prints_the_no_known_labels_warning_once(tmp_path):
    """A one-epoch run on 8 images whose attribute b is all NA: its warning appears exactly once."""
    root = dataset(tmp_path, "img a b\n" + "".join(f"i{n}.png {n % 2} NA\n" for n in range(8)),
                   images=[f"i{n}.png" for n in range(8)])
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "ATTRCLF_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-m", "attrclf", "train", "--data", str(root), "--backbone", "test_resnet",
                             "--no-pretrained", "--image-size", "32", "--epochs", "1", "--batch-size", "4",
                             "--num-workers", "0", "--output-dir", str(tmp_path / "out")],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    output = result.stdout + result.stderr
    assert output.count("attribute 'b' has no known labels") == 1, output
