"""``graddiff map A.h5 B.h5 -o map.yaml``: propose a name map for review (docs/porting.md).

The thin shell over ``graddiff.diff.automap``: writes the proposed rules (with a confidence and
the evidence for each pair), the ambiguous pairs and the unmatched records of either run; the
map is then edited by hand and given to ``graddiff compare A B --map map.yaml``.
"""

from __future__ import annotations

from typing import Optional

import click

from ..diff.automap import propose_map
from ..diff.namemap import dump_map
from ..diff.stepalign import offset_note
from ..reader import open_run
from ..textsafe import echo


@click.command("map")
@click.argument("run_a", metavar="A.h5")
@click.argument("run_b", metavar="B.h5")
@click.option(
    "-o",
    "--output",
    default=None,
    metavar="FILE",
    help="Write the map here (.yaml, or .json); default: print it.",
)
def map_cmd(run_a: str, run_b: str, output: Optional[str]) -> int:
    """Propose rules from B's record names to A's, from the structure of both runs.

    Exit code 0: every pair is unambiguous and nothing is left unmatched; 1: some pairs are
    ambiguous or some records unmatched (review the map); 2: usage or input error.
    """
    with open_run(run_a) as a, open_run(run_b) as b:
        proposal = propose_map(a, b)
        note = offset_note(a, b)
    data = proposal.to_dict()
    if output:
        try:
            dump_map(data, output)
        except OSError as exc:
            raise click.ClickException(f"{output}: cannot write ({exc.strerror or exc})") from None
        echo(f"wrote {len(data['rules'])} rule(s) to {output}")
    else:
        import yaml

        echo(yaml.safe_dump(data, sort_keys=False, width=100), nl=False)
    err = output is None
    amb = proposal.ambiguous
    if amb:
        echo(f"{len(amb)} ambiguous pair(s): review them before use", err=err)
        for p in amb[:10]:
            echo(f"  {p.group} {proposal.described(p)} ({p.evidence})", err=err)
    for side, names in (("A", proposal.unmatched("a")), ("B", proposal.unmatched("b"))):
        if names:
            shown = ", ".join(names[:6]) + (" ..." if len(names) > 6 else "")
            echo(f"unmatched in {side}: {len(names)} ({shown})", err=err)
    if note:
        echo(f"note: {note}", err=err)
    return 1 if amb or proposal.unmatched_a or proposal.unmatched_b else 0
