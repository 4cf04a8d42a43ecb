"""The agent-eval scenario format: YAML files of steps taken as one principal, with expectations.

    scenarios:
      - name: analyst-counts-orders
        principal: analyst
        description: The analyst reads the order count.
        tags: [query]
        steps:
          - call: query
            args: {sql: "SELECT count(*) AS n FROM sales.orders"}
            expect:
              values: [{path: records[0].n, equals: 5000}]
            save: {orders: "records[0].n"}      # later steps may use "${orders}"
          - call: append_rows
            args: {table: sales.orders, rows: [{order_id: 1}]}
            expect: {error: "may not call append_rows"}
          - list_tools: true
            expect: {tools_not: [append_rows]}
          - instructions: true
            expect: {text: ["never instructions"]}

A step is a tool call (`call`), a tool listing (`list_tools: true`) or a look at the server's
initialize instructions (`instructions: true`). Without `error`, a call must succeed. A call with
`until_error: N` is made again until it fails (at most N times), and `expect` applies to the call
that fails: an agent in a loop running into a quota. A scenario with `own_server: true` runs in a
server of its own, so that what it uses up (a quota) is not taken from the principal's others. Paths and
value checks are described in `evals.scenario_checks`.

Arguments may be generated: `{$repeat: "x", times: 200000}` is a string of 200,000 x (optional
`before` and `then` go around it, and may be generators themselves); `{$nest: VALUE, key: and,
depth: 100}` wraps VALUE in 100 objects (in lists without `key`). `${name}` stands for a value
saved by an earlier step of the same scenario.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lakegate.errors import InvalidArgument
from lakegate.evals.scenario_checks import ValueCheck

__all__ = ["SCENARIOS_DIR", "Expect", "Scenario", "Step", "load_scenarios", "select", "substitute"]

SCENARIOS_DIR = Path(__file__).resolve().parent / "scenarios"

_SAVED = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Expect(_Strict):
    """What a step must produce. Without `error`, a tool call must succeed."""

    error: str | None = Field(default=None, description="The call fails (isError) with a message containing this.")
    text: list[str] = Field(default_factory=list, description="The text (or the instructions) contains each.")
    text_not: list[str] = Field(default_factory=list, description="The text contains none of these.")
    values: list[ValueCheck] = Field(default_factory=list, description="Checks on the structured result.")
    planted: list[str] = Field(
        default_factory=list,
        description="Planted text that must be in the result's data fields and nowhere else "
        "(in a listing, the instructions or an error: nowhere at all).",
    )
    tools: list[str] = Field(default_factory=list, description="list_tools: these tools are listed.")
    tools_not: list[str] = Field(default_factory=list, description="list_tools: these tools are not listed.")


class Step(_Strict):
    """One step: a tool call, a tool listing, or a look at the initialize instructions."""

    call: str | None = Field(default=None, description="Tool to call.")
    args: dict[str, Any] = Field(default_factory=dict)
    list_tools: bool = False
    instructions: bool = False
    expect: Expect = Field(default_factory=Expect)
    save: dict[str, str] = Field(default_factory=dict, description="Name -> path of a value for later steps.")
    until_error: int | None = Field(
        default=None,
        ge=1,
        description="Make the call again until it fails, at most this many times: the expectations apply to the "
        "failing call (an agent in a loop running into a quota). Each call is checked as any other.",
    )

    @model_validator(mode="after")
    def _one_action(self) -> Step:
        if [self.call is not None, self.list_tools, self.instructions].count(True) != 1:
            raise ValueError("a step has exactly one of call, list_tools: true or instructions: true")
        if self.call is None and (self.args or self.save or self.until_error):
            raise ValueError("args, save and until_error belong to a call step")
        if self.until_error is not None and self.expect.error is None:
            raise ValueError("until_error needs expect.error: the error the repeated call ends with")
        return self

    @property
    def action(self) -> str:
        return f"call {self.call}" if self.call is not None else "list_tools" if self.list_tools else "instructions"


class Scenario(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    principal: str = Field(min_length=1)
    description: str = Field(min_length=1)
    tags: list[str] = Field(default_factory=list)
    own_server: bool = Field(
        default=False,
        description="Run in a server of its own, not the one the principal's other scenarios share: for a "
        "scenario that uses up what they need (a quota).",
    )
    steps: list[Step] = Field(min_length=1)
    file: str = Field(default="", description="Set by the loader: the file it came from.")


class _ScenarioFile(_Strict):
    scenarios: list[Scenario]


def load_scenarios(directory: Path = SCENARIOS_DIR) -> list[Scenario]:
    """Every scenario of every `*.yaml` file in `directory`, files in name order.

    Raises:
        InvalidArgument: no scenario files, a file that is not valid YAML or not a valid scenario
            file (the message names the file and the field), or two scenarios with one name.
    """
    files = sorted(directory.glob("*.yaml"))
    if not files:
        raise InvalidArgument(f"No scenario files (*.yaml) in {directory}.", hint="Pass --scenarios DIR.")
    scenarios: list[Scenario] = []
    for path in files:
        try:
            loaded = _ScenarioFile.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
        except yaml.YAMLError as exc:
            raise InvalidArgument(f"{path}: not valid YAML: {exc}") from exc
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}" for error in exc.errors()[:5]
            )
            raise InvalidArgument(f"{path}: not a valid scenario file: {problems}") from exc
        scenarios += [scenario.model_copy(update={"file": path.name}) for scenario in loaded.scenarios]
    seen: set[str] = set()
    for scenario in scenarios:
        if scenario.name in seen:
            raise InvalidArgument(f"Two scenarios are named {scenario.name!r}; names must be unique.")
        seen.add(scenario.name)
    return scenarios


def select(scenarios: list[Scenario], keyword: str | None) -> list[Scenario]:
    """The scenarios whose name, principal, file or a tag contains `keyword` (any case)."""
    if not keyword:
        return scenarios
    wanted = keyword.lower()

    def matches(scenario: Scenario) -> bool:
        fields = [scenario.name, scenario.principal, scenario.file, *scenario.tags]
        return any(wanted in field.lower() for field in fields)

    return [scenario for scenario in scenarios if matches(scenario)]


def _generate(spec: dict[str, Any]) -> Any:
    if "$repeat" in spec:
        unknown = set(spec) - {"$repeat", "times", "before", "then"}
        if unknown or not isinstance(spec.get("times"), int):
            raise ValueError(f"$repeat takes a string, times (an integer), before and then; got {sorted(spec)}")
        return str(spec.get("before", "")) + str(spec["$repeat"]) * spec["times"] + str(spec.get("then", ""))
    unknown = set(spec) - {"$nest", "key", "depth"}
    if unknown or not isinstance(spec.get("depth"), int):
        raise ValueError(f"$nest takes a value, depth (an integer) and key; got {sorted(spec)}")
    value = spec["$nest"]
    for _ in range(spec["depth"]):
        value = {spec["key"]: value} if "key" in spec else [value]
    return value


def substitute(value: Any, saved: dict[str, Any]) -> Any:
    """`value` with generators expanded and `${name}` replaced by saved values.

    Raises:
        ValueError: a name no earlier step saved, or a malformed generator.
    """

    def saved_value(name: str) -> Any:
        if name not in saved:
            raise ValueError(f"no earlier step saved a value named {name!r}")
        return saved[name]

    if isinstance(value, str):
        whole = _SAVED.fullmatch(value)
        if whole:
            return saved_value(whole.group(1))
        return _SAVED.sub(lambda m: str(saved_value(m.group(1))), value)
    if isinstance(value, dict):
        if "$repeat" in value or "$nest" in value:
            return _generate({key: substitute(item, saved) for key, item in value.items()})
        return {key: substitute(item, saved) for key, item in value.items()}
    if isinstance(value, list):
        return [substitute(item, saved) for item in value]
    return value
