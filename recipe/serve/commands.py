"""`recipe serve`, `recipe edit` and `recipe generate`: one store format for the server and the CLI.

Facts files for ``recipe edit --facts`` are JSON Lines (one object per line with ``prompt``,
``target_new`` and optionally ``subject``) or CSV (``.csv``, a header row naming the same columns).
"""
from __future__ import annotations

import csv
import json
import logging
import os
import secrets
from pathlib import Path

from recipe.errors import RecipeError

log = logging.getLogger(__name__)

TEST_MODEL = "tiny-llama"  # a random 4-layer Llama built in code (recipe.testing): for tests only
FACTS_HELP = ("facts to store: JSON Lines, one {\"prompt\": ..., \"target_new\": ..., \"subject\": ...} per line "
              "(subject optional), or CSV (.csv) with a header row prompt,target_new[,subject]")


def _load_lm(args):
    from recipe.lm import EditedLM

    if args.model == TEST_MODEL:
        from recipe.testing import tiny_model

        model, tokenizer, spec = tiny_model()
    else:
        from recipe.cli import default_device
        from recipe.models import load_model

        model, tokenizer, spec = load_model(args.model, device=args.device or default_device())
    return EditedLM(model, tokenizer, spec, max_batch=args.batch_size)


def open_facts(args):
    """The model, the editor and the store of ``args`` (checked before the model loads)."""
    from recipe.cli import parse_overrides
    from recipe.editors import EDITORS, load_editor
    from recipe.errors import UnknownNameError
    from recipe.serve.facts import Facts
    from recipe.serve.store import EditStore

    if args.editor not in EDITORS:
        raise UnknownNameError(f"unknown editor {args.editor!r}; available: {sorted(EDITORS)}")
    overrides = parse_overrides(args.set)
    store = EditStore(args.store)  # refuses a store another process holds, before the model loads
    try:
        lm = _load_lm(args)
        editor = load_editor(args.editor, lm, args.config, **overrides)
        return Facts(editor, store, snapshot_every=args.snapshot_every)
    except BaseException:
        store.close()
        raise


def read_facts(path: str | Path) -> list:
    """Facts from a JSONL or CSV file, each checked like a request to the edits API."""
    from pydantic import ValidationError

    from recipe.serve.facts import Fact
    from recipe.serve.schemas import EditIn

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise RecipeError(f"cannot read facts file {path}: {e.strerror}") from None
    if path.suffix.lower() == ".csv":
        rows = [(n, {k: v for k, v in row.items() if v not in (None, "")})
                for n, row in enumerate(csv.DictReader(text.splitlines()), 2)]
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise RecipeError(f"{path} line {n}: not JSON ({e.msg})") from None
    facts = []
    for n, row in rows:
        try:
            fact = EditIn.model_validate(row)
        except ValidationError as e:
            first = e.errors()[0]
            raise RecipeError(f"{path} line {n}: {'.'.join(map(str, first['loc'])) or 'row'}: {first['msg']}") from None
        facts.append(Fact(fact.prompt, fact.target_new, fact.subject))
    if not facts:
        raise RecipeError(f"{path} holds no facts")
    return facts


def cmd_edit(args) -> int:
    new = read_facts(args.facts) if args.facts is not None else None  # a bad file fails before the model loads
    facts = open_facts(args)
    try:
        if args.remove is not None:
            facts.remove(args.remove)
            print(f"removed edit {args.remove}")
        if new is not None:
            for r in facts.add(new):
                print(f"{r.id}\t{r.prompt} -> {r.target_new}")
        if args.list:
            for r in facts.find():
                note = "" if r.status == "active" else f"\t({r.status} by {r.superseded_by})"
                print(f"{r.id}\t{r.prompt} -> {r.target_new}{note}")
    finally:
        facts.close()
    return 0


def cmd_generate(args) -> int:
    import sys

    from recipe.serve.engine import Engine, Query, Sampling

    facts = open_facts(args)
    engine = Engine(facts.editor.lm, facts, max_batch=args.batch_size)
    sampling = Sampling(max_tokens=args.max_tokens)
    try:
        prompts = args.prompt or (line.strip() for line in sys.stdin if line.strip())  # interactive: one per line
        for prompt in prompts:
            done = engine.generate([Query(prompt, prompt)], sampling).result()[0]
            edit = done.audit.get("edit_id")
            print(f"{prompt}{done.text}")
            print(f"  [edit {edit}]" if edit is not None else "  [no edit]", file=sys.stderr)
    finally:
        engine.close()
    return 0


def cmd_serve(args) -> int:
    import uvicorn

    from recipe.serve.app import create_app
    from recipe.serve.engine import Engine

    token = args.admin_token or os.environ.get("RECIPE_ADMIN_TOKEN")
    if not token:
        token = secrets.token_urlsafe(24)
        log.warning("no --admin-token or RECIPE_ADMIN_TOKEN given; the edits API token is %s", token)
    facts = open_facts(args)
    engine = Engine(facts.editor.lm, facts, max_batch=args.batch_size)
    app = create_app(engine, args.model, token, api_key=args.api_key or os.environ.get("RECIPE_API_KEY"))
    log.info("serving %s with editor %r on http://%s:%d/v1 (store %s)", args.model, args.editor, args.host,
             args.port, facts.store.dir)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def add_parsers(sub, common) -> None:
    """The `serve`, `edit` and `generate` subcommands (``common`` adds --model/--editor/--config/--set)."""
    from recipe.cli import positive_int

    def store_args(p):
        common(p, "recipe")
        p.add_argument("--store", required=True, metavar="DIR",
                       help="edit store folder: journal + snapshots, shared by serve, edit and generate")
        p.add_argument("--snapshot-every", type=positive_int, default=1000, metavar="N",
                       help="snapshot the editor every N changes (default: %(default)s; also on exit)")

    serve = sub.add_parser("serve", help="an OpenAI-compatible server whose facts are edited live (/v1/edits)",
                           description="POST /v1/completions and /v1/chat/completions (OpenAI's API, stream: true "
                                       "as server-sent events), GET /v1/models, and the edits API "
                                       "(/v1/edits, bearer admin token). Edits are durable once acknowledged.")
    store_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, loopback only)")
    serve.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    serve.add_argument("--admin-token", default=None,
                       help="bearer token of the edits API (default: $RECIPE_ADMIN_TOKEN; else a random one, logged)")
    serve.add_argument("--api-key", default=None,
                       help="bearer token the completion API requires (default: $RECIPE_API_KEY; else none)")
    serve.set_defaults(func=cmd_serve)

    edit = sub.add_parser("edit", help="add, remove or list the facts of an edit store without a server",
                          description=f"--facts: {FACTS_HELP}. A prompt stated again with a new answer "
                                      "supersedes the stored one.")
    store_args(edit)
    edit.add_argument("--facts", default=None, metavar="FILE", help=FACTS_HELP)
    edit.add_argument("--remove", type=positive_int, default=None, metavar="ID", help="delete the edit with this id")
    edit.add_argument("--list", action="store_true", help="print every stored edit (id, prompt -> answer)")
    edit.set_defaults(func=cmd_edit)

    gen = sub.add_parser("generate", help="continue prompts with the facts of an edit store applied",
                         description="Prints each prompt with its continuation; which edit shaped it goes to "
                                     "stderr. Without prompts, reads one prompt per line from stdin.")
    store_args(gen)
    gen.add_argument("prompt", nargs="*", help="prompts (default: one per line from stdin)")
    gen.add_argument("--max-tokens", type=positive_int, default=20, help="new tokens per prompt (default: %(default)s)")
    gen.set_defaults(func=cmd_generate)
