import subprocess
import sys

from typer.testing import CliRunner

from zmdevice.cli import app


def test_help_lists_every_command():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("label", "train", "export", "predict", "evaluate", "demo"):
        assert command in result.output


def test_help_imports_no_heavy_library():
    code = (
        "import sys; from zmdevice.cli import app\n"
        "from typer.testing import CliRunner\n"
        "CliRunner().invoke(app, ['--help'])\n"
        "heavy = [m for m in ('torch', 'transformers', 'open_clip', 'onnxruntime') "
        "if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_unknown_device_is_a_one_line_error_with_exit_2(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("text\nhello\n")
    result = CliRunner().invoke(
        app,
        ["label", str(table), "--classes", "a,b", "--teacher", "minilm", "--device", "tpu"],
    )
    assert result.exit_code == 2
    assert "unknown device 'tpu'" in result.output
    assert "Traceback" not in result.output


def test_bad_data_reaches_the_user_as_one_line_and_exit_2(tmp_path):
    """Data-layer errors surface through every command the same way: one line, exit 2."""
    table = tmp_path / "t.csv"
    table.write_text("sentence\nhello\n")
    cases = [
        (["label", str(tmp_path / "missing.csv"), "--classes", "a,b", "--teacher", "minilm"],
         "missing.csv"),
        (["label", str(table), "--classes", "a,b", "--teacher", "minilm"], "'text'"),
        (["evaluate", str(tmp_path / "model.onnx"), "--data", str(table)], "model.onnx"),
    ]  # fmt: skip
    for args, named in cases:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, result.output
        message = result.output.strip()
        assert message.startswith("error: ") and "\n" not in message
        assert named in message
        assert "Traceback" not in result.output
