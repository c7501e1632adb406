"""The command line: help, list, and one clear error line (exit 2) for bad names."""
import pytest

from recipe.cli import build_parser, main


def test_help_mentions_every_command(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    for cmd in ("demo", "eval", "list"):
        assert cmd in out


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "ft" in out and "zsre" in out


@pytest.mark.parametrize("argv, needle", [
    (["eval", "--editor", "nope", "--dataset", "demo"], "unknown editor"),
    (["eval", "--dataset", "nope"], "nope"),
    (["eval", "--dataset", "demo", "--model", "no-such-model"], "unknown model"),
    (["eval", "--dataset", "demo", "--set", "steps"], "key=value"),
])
def test_bad_names_give_one_clear_error(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("recipe: error:") and needle in err
    assert "Traceback" not in err
