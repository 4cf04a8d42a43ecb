"""First calls without a wait: serving embeds with the verified ONNX graph (no torch), a tampered
graph is refused and rebuilt, and the start-up warm-up prepares what the first calls need."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lakegate.catalog.embedder import MODEL_SHA256, get_embedder
from lakegate.catalog.query_embedder import QueryEmbedder, get_query_embedder
from lakegate.catalog.query_graph import GRAPH_DIR, graph_path, load_query_graph
from lakegate.server.app import Runtime
from lakegate.server.warm_up import warm_up

REPO = Path(__file__).resolve().parents[1]

#: The serving path in a process of its own: open the runtime, warm up, search, then report what
#: was imported.
SERVE_AND_SEARCH = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import anyio
    from lakegate.server.app import open_runtime
    from lakegate.server.gate.identity import CallOrigin, stdio_principal
    from lakegate.server.settings import load_settings
    from lakegate.server.warm_up import warm_up

    runtime = open_runtime(load_settings(sys.argv[1], home=Path(sys.argv[2]), audit={"path": Path(sys.argv[3])}))
    took = warm_up(runtime)
    origin = CallOrigin(transport="in-process", session_id="cold")
    answers = {}
    for who, tool, arguments in (
        ("support_agent", "search_documents", {"query": "refund for a damaged parcel", "mode": "vector", "k": 3}),
        ("analyst", "search_catalog", {"query": "money we made"}),
        ("analyst", "query", {"sql": "SELECT count(*) FROM sales.orders"}),
    ):
        outcome = anyio.run(runtime.gate.call, tool, arguments, stdio_principal(who, runtime.enforcer), origin)
        answers[tool] = outcome.error is None
    runtime.close()
    loaded = sorted(name for name in ("torch", "sentence_transformers", "transformers") if name in sys.modules)
    print(json.dumps({"warm_up": took, "answers": answers, "loaded": loaded}))
    """
)


def _serving_process(script: str, home: Path, tmp_path: Path) -> dict[str, Any]:
    """Run `script` in a process of its own over the project and `home`; the JSON it printed last."""
    done = subprocess.run(
        [sys.executable, "-c", script, str(REPO), str(home), str(tmp_path / "audit.jsonl")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


def test_serving_embeds_without_torch(demo_home: Path, tmp_path: Path) -> None:
    assert load_query_graph(demo_home / GRAPH_DIR) is not None, "the demo build writes the verified graph"
    report = _serving_process(SERVE_AND_SEARCH, demo_home, tmp_path)
    assert report["answers"] == {"search_documents": True, "search_catalog": True, "query": True}, report
    assert all(seconds >= 0 for seconds in report["warm_up"].values()), report["warm_up"]
    assert report["loaded"] == [], f"the serving process imported {report['loaded']}"


def test_the_onnx_path_gives_the_torch_vectors(demo_home: Path) -> None:
    encoder = get_query_embedder(demo_home / GRAPH_DIR)
    assert isinstance(encoder, QueryEmbedder)
    texts = ["refund for a damaged parcel", "Which customers churned last quarter?"]
    torch_vectors = get_embedder().embed(texts)
    assert np.allclose(encoder.embed(texts), torch_vectors, atol=1e-5)


def test_a_graph_that_does_not_verify_is_refused_and_rebuilt(demo_home: Path, tmp_path: Path) -> None:
    directory = tmp_path / GRAPH_DIR
    shutil.copytree(demo_home / GRAPH_DIR, directory)
    path = graph_path(directory)
    assert path.name.endswith(f"{MODEL_SHA256[:16]}.onnx") and load_query_graph(directory) is not None

    tampered = bytearray(path.read_bytes())
    tampered[len(tampered) // 2] ^= 0xFF
    path.write_bytes(bytes(tampered))
    assert load_query_graph(directory) is None  # never loaded

    manifest = path.with_name(path.name + ".json")
    other_model = json.loads(manifest.read_text()) | {"model_sha256": "0" * 64}
    shutil.copy(demo_home / GRAPH_DIR / path.name, path)  # the right graph, but a manifest of another model
    manifest.write_text(json.dumps(other_model))
    assert load_query_graph(directory) is None

    # The server's encoder rebuilds it (torch is loaded in this process anyway), then uses it.
    assert isinstance(get_query_embedder(directory), QueryEmbedder)
    assert load_query_graph(directory) == (demo_home / GRAPH_DIR / path.name).read_bytes()


def test_the_warm_up_prepares_each_first_call(runtime: Runtime) -> None:
    took = warm_up(runtime)
    assert set(took) == {"iceberg_catalog", "query_worker", "query_encoder", "catalog_search"}
    assert all(seconds >= 0 for seconds in took.values()), took
    again = warm_up(runtime)  # everything is ready: the second pass costs next to nothing
    assert sum(again.values()) < max(1.0, sum(took.values())), (took, again)


@pytest.mark.parametrize("missing", [True, False])
def test_models_commands_build_and_verify_the_graph(tmp_path: Path, missing: bool) -> None:
    from click.testing import CliRunner

    from lakegate.server.cli.main import cli

    home = tmp_path / "home"
    env = {"LAKEGATE_HOME": str(home)}
    runner = CliRunner()
    if missing:
        verified = runner.invoke(cli, ["--project", str(REPO), "models", "verify"], env=env)
        assert verified.exit_code == 1 and "lakegate models build" in verified.output
        return
    built = runner.invoke(cli, ["--project", str(REPO), "models", "build"], env=env)
    assert built.exit_code == 0, built.output
    verified = runner.invoke(cli, ["--project", str(REPO), "models", "verify"], env=env)
    assert verified.exit_code == 0 and "verified" in verified.output


#: A search while another thread builds the encoder's graph (as the warm-up does on a state
#: directory without one): it ranks by words and says so, rather than wait; once the graph is
#: built, by meaning too.
SEARCH_WHILE_BUILDING = textwrap.dedent(
    """
    import json, sys, threading, time
    from pathlib import Path
    import anyio
    from lakegate.catalog.query_embedder import get_query_embedder
    from lakegate.server.app import open_runtime
    from lakegate.server.gate.identity import CallOrigin, stdio_principal
    from lakegate.server.settings import load_settings

    runtime = open_runtime(load_settings(sys.argv[1], home=Path(sys.argv[2]), audit={"path": Path(sys.argv[3])}))
    origin = CallOrigin(transport="in-process", session_id="cold")
    calls = (
        ("analyst", "search_catalog", {"query": "revenue of orders"}),
        ("support_agent", "search_documents", {"query": "refund for a damaged parcel", "k": 3}),
    )

    def notes():
        found = {}
        for who, tool, arguments in calls:
            outcome = anyio.run(runtime.gate.call, tool, arguments, stdio_principal(who, runtime.enforcer), origin)
            assert outcome.error is None, outcome.error
            result = outcome.result.model_dump()
            found[tool] = [result["note"], len(result.get("matches", result.get("passages")))]
        return found

    builder = threading.Thread(target=get_query_embedder, args=(runtime.warehouse.models_dir,))
    builder.start()
    while "torch" not in sys.modules:  # imported only inside the build, under the encoder's lock
        time.sleep(0.01)
    during = notes()
    still_building = builder.is_alive()
    builder.join()
    after = notes()
    runtime.close()
    print(json.dumps({"during": during, "still_building": still_building, "after": after}))
    """
)


def test_a_search_during_the_encoders_build_ranks_by_words_instead_of_waiting(demo_home: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    shutil.copytree(demo_home, home, ignore=shutil.ignore_patterns(GRAPH_DIR))  # a state without the graph
    report = _serving_process(SEARCH_WHILE_BUILDING, home, tmp_path)
    assert report["still_building"], report  # the answers came while the build went on
    for tool in ("search_catalog", "search_documents"):
        note, found = report["during"][tool]
        assert note is not None and "words only" in note and found > 0, report
        note, found = report["after"][tool]
        assert note is None and found > 0, report
