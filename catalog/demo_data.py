"""The demo warehouse's prose, read from package data and validated into frozen models on load.

- catalog/demo_vocabulary.yaml: the names, brands and product catalogue customers and products are
  drawn from;
- catalog/demo_tickets.yaml: what customers write in support tickets;
- catalog/demo_kb.yaml: the knowledge-base topics, written once per region;
- catalog/demo_injections.yaml: the prompt injection planted in the data for the red-team evals.

Each file is read once per process. A file that does not validate (a missing field, a list where
a string belongs, a {placeholder} that nothing fills in) raises ConfigurationError naming the file
and the place; the demo is never built from half of one.
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from functools import cache
from importlib import resources
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lakegate.errors import ConfigurationError

__all__ = [
    "Category",
    "InjectedArticle",
    "Injections",
    "KbRegion",
    "KbTopic",
    "KnowledgeBase",
    "TicketTemplate",
    "TicketTemplates",
    "Vocabulary",
    "injections",
    "knowledge_base",
    "load_demo_file",
    "parse_demo_file",
    "ticket_templates",
    "vocabulary",
]

VOCABULARY_FILE = "demo_vocabulary.yaml"
TICKETS_FILE = "demo_tickets.yaml"
KB_FILE = "demo_kb.yaml"
INJECTIONS_FILE = "demo_injections.yaml"

#: What a ticket template may name: filled in from the order and its customer.
TICKET_FIELDS = frozenset({"order", "product", "name", "phone"})
#: What a knowledge-base pool context may name (large scale).
POOL_FIELDS = frozenset({"country", "channel", "category"})

_Words = tuple[str, ...]


def _placeholders(template: str) -> set[str]:
    """The {names} of a format string.

    Raises:
        ValueError: an unbalanced brace, or a positional {} (nothing fills one in).
    """
    names = {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
    if "" in names or any(name.isdigit() for name in names):
        raise ValueError(f"{template!r} has a positional {{}}: name what fills it in")
    return names


def _check_placeholders(templates: Iterable[str], allowed: Iterable[str]) -> None:
    known = set(allowed)
    for template in templates:
        unknown = _placeholders(template) - known
        if unknown:
            shown = template if len(template) <= 60 else template[:57] + "..."
            raise ValueError(f"{shown!r} names {sorted(unknown)}; only {sorted(known)} are filled in")


def _without_separator(text: str) -> str:
    # Text renderings of query results separate cells with "|".
    if "|" in text:
        raise ValueError(f"{text[:40]!r}... may not contain '|': text renderings separate cells with it")
    return text


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# -- demo_vocabulary.yaml ----------------------------------------------------------------------


class Category(_Frozen):
    """A product category: its SKU prefix, its list-price range and the products it sells."""

    name: str = Field(pattern=r"^[a-z][a-z_]*$")
    sku_prefix: str = Field(pattern=r"^[A-Z]{3}$")
    low_cents: int = Field(gt=0)
    high_cents: int
    products: _Words = Field(min_length=1)

    @model_validator(mode="after")
    def _price_range(self) -> Category:
        if self.high_cents <= self.low_cents:
            raise ValueError(f"category {self.name}: high_cents must be above low_cents")
        return self


class Vocabulary(_Frozen):
    first_names: _Words = Field(min_length=1)
    last_names: _Words = Field(min_length=1)
    brands: _Words = Field(min_length=1)
    categories: tuple[Category, ...] = Field(min_length=1)


# -- demo_tickets.yaml -------------------------------------------------------------------------


class TicketTemplate(_Frozen):
    subject: str = Field(min_length=1)
    body: str = Field(min_length=1)

    @model_validator(mode="after")
    def _known_placeholders(self) -> TicketTemplate:
        _check_placeholders((self.subject, self.body), TICKET_FIELDS)
        return self

    def fill(self, **values: str | int) -> tuple[str, str]:
        """The subject and body with {order}, {product}, {name} and {phone} filled in."""
        return self.subject.format(**values), self.body.format(**values)


class TicketTemplates(_Frozen):
    """Templates by the status of the order a ticket is about."""

    returned: tuple[TicketTemplate, ...] = Field(min_length=1)
    cancelled: tuple[TicketTemplate, ...] = Field(min_length=1)
    other: tuple[TicketTemplate, ...] = Field(min_length=1)


# -- demo_kb.yaml ------------------------------------------------------------------------------


class KbRegion(_Frozen):
    """What an article says for one sales region; each field fills the {placeholder} of its name."""

    region: str  # the sales region code (sales.customers.region)
    key: str = Field(pattern=r"^[a-z]+$")  # the doc_id suffix
    area: str
    currency: str
    days: str  # the return window
    carrier: str
    standard: str  # business days, standard delivery
    express: str  # business days, express delivery
    free: str  # free shipping above
    warranty: str
    hours: str  # service hours
    law: str  # privacy law
    years: str  # order record retention
    limit: str  # an agent's refund approval limit
    lead: str  # who escalations go to
    extra: str  # regional payment methods
    authority: str  # who a breach is reported to
    tax: str

    def values(self) -> dict[str, str]:
        return self.model_dump()


class KbTopic(_Frozen):
    """One topic; written once per region, the title and paragraphs filled in from the region."""

    slug: str = Field(pattern=r"^[a-z][a-z0-9-]*$")
    title: str = Field(min_length=1)
    classification: str = Field(min_length=1)
    paragraphs: _Words = Field(min_length=1)


class KnowledgeBase(_Frozen):
    regions: tuple[KbRegion, ...] = Field(min_length=1)
    topics: tuple[KbTopic, ...] = Field(min_length=1)
    pool_contexts: _Words = Field(min_length=1)

    @model_validator(mode="after")
    def _known_placeholders(self) -> KnowledgeBase:
        for topic in self.topics:
            _check_placeholders((topic.title, *topic.paragraphs), KbRegion.model_fields)
        _check_placeholders(self.pool_contexts, POOL_FIELDS)
        slugs = [topic.slug for topic in self.topics]
        keys = [region.key for region in self.regions]
        for kind, names in (("topic slug", slugs), ("region key", keys)):
            if len(set(names)) != len(names):
                raise ValueError(f"a {kind} is listed twice in {names}: doc_ids must be unique")
        return self


# -- demo_injections.yaml ----------------------------------------------------------------------


class InjectedArticle(_Frozen):
    doc_id: str = Field(pattern=r"^[a-z][a-z0-9-]*$")
    title: str = Field(min_length=1)
    classification: str = Field(min_length=1)
    text: str = Field(min_length=1)


class Injections(_Frozen):
    """The planted prompt injection: product 1's name, ticket 1's body and one article."""

    product_name: str = Field(min_length=1)
    ticket_body: str = Field(min_length=1)
    article: InjectedArticle

    @model_validator(mode="after")
    def _no_cell_separator(self) -> Injections:
        for text in (self.product_name, self.ticket_body, self.article.title, self.article.text):
            _without_separator(text)
        return self


# -- loading -----------------------------------------------------------------------------------

_Model = TypeVar("_Model", bound=BaseModel)


def parse_demo_file(text: str, origin: str, model: type[_Model]) -> _Model:
    """Validate the YAML `text` of a demo data file as `model`; `origin` names the file in the error.

    Raises:
        ConfigurationError: not YAML, or not the schema (the message says where).
    """
    try:
        return model.model_validate(yaml.safe_load(text))
    except (yaml.YAMLError, ValidationError) as exc:
        raise ConfigurationError(f"{origin} (demo package data) is malformed: {exc}") from exc


def load_demo_file(name: str, model: type[_Model]) -> _Model:
    """Read catalog/<name> from the installed package and validate it as `model`.

    Raises:
        ConfigurationError: the file is missing, not YAML or not the schema (the message says where).
    """
    origin = f"catalog/{name}"
    try:
        text = resources.files("lakegate.catalog").joinpath(name).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(f"{origin} (demo package data) cannot be read: {exc}") from exc
    return parse_demo_file(text, origin, model)


@cache
def vocabulary() -> Vocabulary:
    """catalog/demo_vocabulary.yaml. Raises: ConfigurationError (missing or malformed)."""
    return load_demo_file(VOCABULARY_FILE, Vocabulary)


@cache
def ticket_templates() -> TicketTemplates:
    """catalog/demo_tickets.yaml. Raises: ConfigurationError (missing or malformed)."""
    return load_demo_file(TICKETS_FILE, TicketTemplates)


@cache
def knowledge_base() -> KnowledgeBase:
    """catalog/demo_kb.yaml. Raises: ConfigurationError (missing or malformed)."""
    return load_demo_file(KB_FILE, KnowledgeBase)


@cache
def injections() -> Injections:
    """catalog/demo_injections.yaml. Raises: ConfigurationError (missing or malformed)."""
    return load_demo_file(INJECTIONS_FILE, Injections)
