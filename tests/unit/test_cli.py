"""Unit tests of the command line: no abbreviated flags, and no secret in a usage error."""

from __future__ import annotations

import pytest

from bridge import cli


@pytest.mark.parametrize("argv", [
    ["run", "--amqp-ur", "amqp://bridge:s3cret-pw@rabbit/%2F"],
    ["run", "--amqp-ur=amqp://bridge:s3cret-pw@rabbit/%2F"],
    ["run", "--aut", "Bearer s3cret-pw"],
    ["run", "--apike", "s3cret-pw"],
])
def test_an_abbreviated_flag_is_an_error_that_does_not_echo_its_value(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.build_parser("run").parse_args(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert "unrecognized arguments: --" in err
    assert "s3cret-pw" not in err


def test_whole_flag_names_still_parse():
    args = cli.build_parser("run").parse_args(["run", "--amqp-url", "amqp://h/%2F", "--auth=x"])
    assert (args.amqp_url, args.auth) == ("amqp://h/%2F", "x")
