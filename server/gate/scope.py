"""The gate's face inside one tool call.

A tool handler receives a `CallScope` and nothing else: no engine, no transport, no audit log. Every
read goes through a scope method that takes the Casbin decision first and records what was touched,
so that the audit record built after the call lists each resource with its version and access.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from lakegate.catalog.definitions import CatalogDefinitions, DatasetDoc
from lakegate.catalog.warehouse import DatasetInfo, Warehouse
from lakegate.errors import NotFound, PolicyDenied
from lakegate.policies.columns import ColumnAccess, column_access
from lakegate.policies.enforcer import Decision, PolicyEnforcer
from lakegate.policies.explain import EXPLAIN_OTHERS, SubjectPolicy
from lakegate.policies.resources import classification_resource, column_resource, metric_resource
from lakegate.server.gate.identity import Principal
from lakegate.server.gate.touched import Touched
from lakegate.server.gate.write_scope import WriteScope
from lakegate.server.settings import Settings

if TYPE_CHECKING:
    from lakegate.catalog.document_search import DocumentSearch, SearchMode
    from lakegate.catalog.iceberg_scan import ScanPlan
    from lakegate.catalog.ingest import Document, IngestOutcome
    from lakegate.catalog.live_metrics import LiveMetrics
    from lakegate.catalog.metric_definitions import SavedQuery, SemanticCatalog
    from lakegate.catalog.metric_query import CompiledQuery, MetricQuery
    from lakegate.catalog.query_embedder import TextEncoder
    from lakegate.catalog.sql_engine import SqlEngine
    from lakegate.policies.column_review import ColumnReview
    from lakegate.policies.quotas import QuotaSet
    from lakegate.policies.row_filters import RowFilter
    from lakegate.policies.scan_limits import ScanLimit
    from lakegate.policies.sql_filters import ColumnFilter
    from lakegate.server.gate.quotas import ScanBudget
    from lakegate.tools.scope import QueryPage

__all__ = ["CallScope", "ProgressFn", "Touched"]

ProgressFn = Callable[[float, float | None, str | None], None]


class CallScope(WriteScope):
    """Authorised access to lakegate's data for one call by one principal."""

    def __init__(
        self,
        principal: Principal,
        enforcer: PolicyEnforcer,
        warehouse: Warehouse,
        definitions: CatalogDefinitions,
        settings: Settings,
        progress: ProgressFn | None = None,
        metrics: LiveMetrics | None = None,
    ) -> None:
        self.principal = principal
        self.settings = settings
        self.limits = settings.limits
        self.definitions = definitions
        self._metrics = metrics
        self._enforcer = enforcer
        self._warehouse = warehouse
        self._progress = progress
        self.touched: list[Touched] = []
        self.rules: list[tuple[str, ...]] = []
        self.rows = 0
        #: Call-specific facts for the audit record (the rewritten SQL, snapshots written, ...).
        self.details: dict[str, Any] = {}
        self._on_cancel: list[Callable[[], None]] = []
        self.cancelled = False
        #: What is left of the caller's daily scan quota (server/gate/quotas.py); None: not limited.
        self.scan_budget: ScanBudget | None = None
        #: Bytes of data files planned by the queries this call ran (counted against that quota).
        self.scan_bytes = 0

    # --- decisions -----------------------------------------------------------------------------

    def decide(self, obj: str, action: str) -> Decision:
        """Ask the policy without failing; the deciding rule is kept for the audit record."""
        decision = self._enforcer.decide(self.principal.name, obj, action)
        if decision.rule and decision.rule not in self.rules:
            self.rules.append(decision.rule)
        return decision

    def require(self, obj: str, action: str, *, kind: str) -> Decision:
        """Take the decision and raise PolicyDenied when it is a denial.

        Raises:
            PolicyDenied: the policy does not allow it (the message names the resource and the rule).
        """
        decision = self.decide(obj, action)
        if not decision.allowed:
            self.touched.append(Touched(kind, obj, "denied"))
            raise PolicyDenied(
                f"Principal '{self.principal.name}' may not {action} {kind} '{obj}' ({decision.rule_text}).",
                hint="Call list_datasets to see what you can use, or ask a data steward for access.",
                rule=list(decision.rule),
            )
        return decision

    def columns(self, dataset: str, names: list[str], field_ids: Mapping[str, int] | None = None) -> list[ColumnAccess]:
        """Column-level access (clear, masked, hidden) for columns of a dataset. `field_ids` names
        each column's Iceberg field (a read of an earlier snapshot passes its own); by default the
        dataset's current schema says, where a review needs to know (policies/column_review.py)."""
        if field_ids is None and self._enforcer.column_review.scopes:
            field_ids = {
                c.name: c.field_id for c in self._warehouse.describe(dataset).columns if c.field_id is not None
            }
        accesses = []
        for name in names:
            field_id = (field_ids or {}).get(name)
            resource = column_resource(dataset, name)
            access = column_access(self._enforcer, self.principal.name, resource, field_id=field_id)
            if access.decision.rule and access.decision.rule not in self.rules:
                self.rules.append(access.decision.rule)
            accesses.append(access)
        return accesses

    def policy_for(self, principal: str | None = None) -> SubjectPolicy:
        """The policy set as it applies to `principal` (default: the caller), for explain_access.

        Another principal's access is policy the caller may not be entitled to see: asking about
        anyone else takes the caller's own `explain:others` decision (action `call`) first.

        Raises:
            PolicyDenied: `principal` is someone else and the caller may not explain others' access.
        """
        subject = self.principal.name if principal is None else principal
        if subject != self.principal.name:
            decision = self.decide(EXPLAIN_OTHERS, "call")
            if not decision.allowed:
                self.touched.append(Touched("policy", EXPLAIN_OTHERS, "denied"))
                raise PolicyDenied(
                    f"Principal '{self.principal.name}' may not explain the access of another principal "
                    f"({decision.rule_text}).",
                    hint="Leave principal out to explain your own access, or ask a data steward.",
                    rule=list(decision.rule),
                )
        return SubjectPolicy(self._enforcer, subject)

    # --- catalog reads -------------------------------------------------------------------------

    def column_review(self) -> ColumnReview:
        """Which columns are hidden until reviewed, and the reviewed ones (policies/column_review.py)."""
        return self._enforcer.column_review

    def tagged_columns(self) -> frozenset[str]:
        """The columns catalog/datasets.yaml tags (reviewed by being tagged)."""
        return self._enforcer.tagged_columns

    def readable_datasets(self) -> list[str]:
        """Names of the datasets this principal may read (and so may see)."""
        names = self._warehouse.dataset_names()
        return [name for name in names if self._enforcer.decide(self.principal.name, name, "read").allowed]

    def dataset(self, name: str) -> tuple[DatasetInfo, DatasetDoc | None]:
        """A dataset's live metadata and its documentation, after a read decision.

        An unknown dataset and a dataset the caller may not read give the same NotFound, so that
        names of hidden datasets do not leak.

        Raises:
            NotFound: no such dataset, or not one this principal may read.
        """
        self.require_dataset(name)
        info = self._warehouse.describe(name)
        self.touched.append(Touched("dataset", name, "metadata", info.current_version))
        return info, self.definitions.dataset(name)

    # --- governed SQL -------------------------------------------------------------------------

    def require_dataset(self, name: str) -> None:
        """Take the read decision on a dataset; unknown and unreadable datasets look the same.

        Raises:
            NotFound: no such dataset, or not one this principal may read.
        """
        if not self.decide(name, "read").allowed:
            self.touched.append(Touched("dataset", name, "denied"))
            raise NotFound(
                f"No dataset named '{name}' is available to you.",
                hint="Call list_datasets to see the datasets you can use.",
            )

    def dataset_kind(self, name: str) -> str:
        """ "iceberg" or "lance"; call after `require_dataset`.

        Raises:
            NotFound: no such dataset.
        """
        return self._warehouse.kind_of(name)

    def plan_scan(self, name: str, as_of: int | datetime | None) -> ScanPlan:
        """The files and schema of table `name` at a snapshot; call after `require_dataset`.

        Raises:
            NotFound: no such table or snapshot.
            InvalidArgument: the table cannot be read correctly (row-level deletes).
        """
        return self._warehouse.scans.plan(name, as_of)

    def prune_scan(self, plan: ScanPlan, filters: Sequence[ColumnFilter]) -> ScanPlan:
        """`plan` narrowed to the files that may hold rows passing the query's `filters` (the whole
        plan when it cannot be narrowed)."""
        return self._warehouse.scans.prune(plan, filters)

    def row_filters(self, dataset: str) -> list[RowFilter]:
        """The row filters the policy set attaches to this principal (and its roles) on `dataset`."""
        return self._enforcer.row_filters(self.principal.name, dataset)

    def roles(self) -> tuple[str, ...]:
        """Every role the caller holds; the enforcer's, so a token's granted roles count
        (server/gate/role_grants.py)."""
        return self._enforcer.roles_for(self.principal.name)

    def scan_limit(self) -> ScanLimit | None:
        """The most one query of this principal may plan to read; None: no cap."""
        return self._enforcer.scan_limits.for_caller(self.principal.name, self.roles())

    def quotas(self) -> QuotaSet:
        """The quotas in force (policies/quotas.py)."""
        return self._enforcer.quotas

    def text_encoder(self) -> TextEncoder:
        """The model search embeds with (its ONNX graph when it verifies: no torch).

        Raises:
            ConfigurationError: the model cannot be loaded.
        """
        from lakegate.catalog.query_embedder import get_query_embedder

        return get_query_embedder(self._warehouse.models_dir)

    def text_encoder_if_ready(self) -> TextEncoder | None:
        """`text_encoder`, or None while the start-up warm-up is still building it (seconds, on a
        state directory without the encoder's graph): a search need not wait for it.

        Raises:
            ConfigurationError: the model cannot be loaded.
        """
        from lakegate.catalog.query_embedder import query_embedder_unless_building

        return query_embedder_unless_building(self._warehouse.models_dir)

    def query_engine(self, kind: str = "duckdb") -> SqlEngine:
        """The engine that runs a governed query: DuckDB in lakegate's own workers, or Spark."""
        if kind == "spark":
            return self._warehouse.spark_engine(self.settings.query)
        return self._warehouse.query_engine(self.settings.query)

    def query(
        self, sql: str, *, as_of: Mapping[str, int | datetime], offset: int, count: int, explain: bool = False
    ) -> QueryPage:
        """Run a governed SQL query as this principal (see server/governed_query.py).

        Raises:
            ClientError: the query is invalid, names what the caller may not read, or ran over a limit.
            ServerError: lakegate or an engine failed.
        """
        from lakegate.server.gate.governed_query import run_query

        return run_query(self, sql, as_of=as_of, offset=offset, count=count, explain=explain)

    # --- metrics ------------------------------------------------------------------------------

    @property
    def semantic(self) -> SemanticCatalog:
        """The metric definitions (documentation, not data: reading them needs no decision).

        Raises:
            NotFound: this server has no semantic layer.
        """
        if self._metrics is None:
            raise NotFound("This lakegate serves no metrics.", hint="Query the tables with the query tool.")
        catalog = self._metrics.catalog
        if self._metrics.rejected is not None:
            # A changed file was refused: these are the last valid definitions, and the record says so.
            self.details["metrics_reload_rejected"] = self._metrics.rejected
        return catalog

    def may_read_metric(self, name: str) -> bool:
        """Whether the policy lets this principal read `metric:<name>`."""
        return self.decide(metric_resource(name), "read").allowed

    def _inputs_of(self, name: str, version: int | None) -> set[str]:
        """Every metric a metric is built on, inputs of inputs included.

        Raises:
            NotFound: the metric or a version it names does not exist.
        """
        found: set[str] = set()
        for used in self.semantic.metric(name, version).referenced_inputs():
            found |= {used.name, *self._inputs_of(used.name, used.version)}
        return found

    def require_metric(self, name: str) -> None:
        """Take the read decision on `metric:<name>`; a metric the caller may not read looks missing.

        Raises:
            NotFound: no such metric, or not one this principal may read.
        """
        if not self.may_read_metric(name):
            self.touched.append(Touched("metric", name, "denied"))
            raise NotFound(f"There is no metric named '{name}' available to you.", hint="Call list_metrics.")

    def _may_read_fully(self, name: str) -> bool:
        """Whether the caller may read a metric and every metric it is built on."""
        try:
            inputs = self._inputs_of(name, None)
        except NotFound:
            return False
        return self.may_read_metric(name) and all(self.may_read_metric(used) for used in inputs)

    def saved_queries(self) -> list[SavedQuery]:
        """The saved queries the caller may ask: every metric of each, inputs included, readable."""
        return [q for q in self.semantic.saved_queries if all(self._may_read_fully(m) for m in q.metrics)]

    def saved_query(self, name: str) -> SavedQuery:
        """A saved query the caller may ask (saved_queries); any other looks missing.

        Raises:
            NotFound: no such saved query, or one with a metric this principal may not read.
        """
        saved = next((q for q in self.saved_queries() if q.name == name), None)
        if saved is None:
            if any(q.name == name for q in self.semantic.saved_queries):  # the record says what policy did
                self.touched.append(Touched("saved_query", name, "denied"))
            raise NotFound(
                f"There is no saved query named '{name}' available to you.", hint="Call list_metrics to see them."
            )
        self.touched.append(Touched("saved_query", name, "read"))
        return saved

    def compile_metrics(self, query: MetricQuery) -> CompiledQuery:
        """Compile a metric query after the decision on every metric it uses, inputs included.

        Raises:
            NotFound: a metric (or an input of one) is unknown or not available to the caller.
            InvalidArgument: the query does not fit the metrics (the message says why).
        """
        from lakegate.catalog.metric_compiler import compile_query

        for name in query.metrics:
            self.require_metric(name)
            # Every input, before anything is compiled: an error must not name a metric the caller
            # may not read, and a metric built on one is as unavailable as that input.
            for used in self._inputs_of(name, query.versions.get(name)):
                if not self.may_read_metric(used):
                    self.touched.append(Touched("metric", used, "denied"))
                    raise NotFound(f"There is no metric named '{name}' available to you.", hint="Call list_metrics.")
        compiled = compile_query(self.semantic, query)
        for name, version in compiled.metrics.items():
            self.require_metric(name)
            self.touched.append(Touched("metric", name, "read", version))
        return compiled

    def record(self, kind: str, name: str, access: str, version: int | None = None) -> None:
        """Note a resource the call touched (for the audit record)."""
        self.touched.append(Touched(kind, name, access, version))

    def on_cancel(self, callback: Callable[[], None]) -> None:
        """Run `callback` if the client cancels the call (it interrupts a running engine)."""
        self._on_cancel.append(callback)
        if self.cancelled:
            callback()

    def cancel(self) -> None:
        """The client cancelled the call: stop the work in flight."""
        self.cancelled = True
        for callback in self._on_cancel:
            callback()

    def report_progress(self, done: float, total: float | None = None, message: str | None = None) -> None:
        """Send an MCP progress notification when the client asked for them."""
        if self._progress is not None:
            self._progress(done, total, message)

    # --- documents -----------------------------------------------------------------------------
    # Policy goes into the search as one prefilter predicate (catalog/document_search.py): the
    # dataset decision, then one decision per classification, then the caller's roles against each
    # passage's allowed_roles. Hidden passages are never ranked, so they are neither returned nor
    # counted, and the caller still gets up to k passages it may read. The same rule decides which
    # documents a writer may replace.

    def _document_access(self, name: str) -> tuple[list[str], tuple[str, ...]]:
        """The classifications of `name` the caller may read, and the roles it holds."""
        from lakegate.catalog.document_search import CLASSIFICATIONS

        readable = [c for c in CLASSIFICATIONS if self.decide(classification_resource(name, c), "read").allowed]
        # The live role graph, the one every decision above was taken with.
        return readable, self._enforcer.roles_for(self.principal.name)

    def _require_replaceable(self, name: str, doc_ids: Sequence[str], access: str | None) -> None:
        """Refuse to replace a document of which the caller may not read every current passage.

        Otherwise a writer could overwrite (and relabel) a document hidden from it. The message
        names the doc_id only: nothing of the hidden document (title, text, labels, or the rule
        that hid it) reaches the caller.

        Raises:
            PolicyDenied: some doc_id already exists with a passage the caller may not read.
        """
        from lakegate.catalog.document_search import hidden_documents

        hidden = sorted(hidden_documents(self._warehouse, name, access, doc_ids=doc_ids))
        if not hidden:
            return
        for doc_id in hidden:
            self.touched.append(Touched("document", f"{name}.doc_id:{doc_id}", "denied"))
        listed = ", ".join(repr(doc_id) for doc_id in hidden)
        raise PolicyDenied(
            f"Principal '{self.principal.name}' may not replace document(s) {listed} in {name}: a document "
            "is replaced only by a principal that may read all of it. Nothing was written.",
            hint="Send it under a new doc_id, or ask a data steward to have its owner change it.",
        )

    def search_documents(
        self,
        name: str,
        query: str,
        *,
        mode: SearchMode,
        k: int,
        classifications: Sequence[str] | None = None,
        source: str | None = None,
        title_contains: str | None = None,
        version: int | None = None,
    ) -> DocumentSearch:
        """Search the passages of Lance dataset `name` this principal may read.

        With `version`, today's rules apply to the old passages: a passage is returned only if the
        caller may read it (its own labels, today's policy) and may read every passage its doc_id
        has in the current version; a doc_id deleted since is judged by the old passage alone.
        Relabelling a document therefore hides its history from those it no longer admits.

        Raises:
            NotFound: no such dataset or version, or a dataset this principal may not read.
            PolicyDenied: a column a passage is returned with is not readable in clear.
            InvalidArgument: not a document dataset; fulltext on a version without a full-text index;
                vector search on a dataset embedded with another model.
            BackendError: lancedb failed.
        """
        from lakegate.catalog.document_search import access_predicate, search_passages
        from lakegate.errors import InvalidArgument

        self.require_dataset(name)
        if self.dataset_kind(name) != "lance":
            raise InvalidArgument(
                f"{name} is a table, not a dataset of documents.", hint="Query tables with the query tool."
            )
        layout = self._warehouse.passage_layout(name)
        unclear = [a.column for a in self.columns(name, layout.shown) if a.access != "clear"]
        if unclear:
            self.touched.append(Touched("column", unclear[0], "denied"))
            raise PolicyDenied(
                f"Principal '{self.principal.name}' may not read {', '.join(unclear)} in clear.",
                hint="Ask a data steward for access to the documents.",
            )
        readable, roles = self._document_access(name)
        access = access_predicate(readable, roles, layout=layout)
        predicate = access_predicate(
            readable,
            roles,
            wanted_classifications=classifications,
            source=source,
            title_contains=title_contains,
            layout=layout,
        )
        found = search_passages(
            self._warehouse, name, query, mode=mode, k=k, predicate=predicate, access=access, version=version
        )
        self.record("dataset", name, "read", found.version)
        self.rows += len(found.hits)
        self.details.update(
            operation="search_documents",
            dataset=name,
            version=found.version,
            mode=mode,
            k=k,
            prefilter=found.predicate,
            readable_classifications=readable,
            results=len(found.hits),
        )
        return found

    def add_documents(
        self, name: str, documents: Sequence[Document], *, chunk_size: int, overlap: int
    ) -> IngestOutcome:
        """Chunk, embed and write documents into Lance dataset `name`, replacing earlier versions of them.

        Decisions first: `write` on the dataset, then `read` on each classification the documents are
        labelled with (a writer may not label what it could not read itself), then, for each doc_id
        that already exists, whether the caller may read every passage of its current version (the
        rule search_documents applies: classification and allowed_roles). That last check runs again
        just before the write. Progress goes to the client per embedding batch.

        allowed_roles needs no decision of its own: it only narrows who of those the policy lets
        read the classification may read the document (search applies both), so a writer cannot
        grant through it what the policy does not.

        Raises:
            NotFound: no such dataset, or one this principal may neither write nor read.
            PolicyDenied: the principal may read but not write the dataset, may not read a
                classification it labels a document with (named), or may not read all of a
                document it would replace (the doc_id named, nothing else of it). Nothing is written.
            InvalidArgument: see catalog.ingest.ingest_documents; nothing is written.
            BackendError: lancedb failed.
        """
        from lakegate.catalog.document_search import access_predicate
        from lakegate.catalog.ingest import ingest_documents
        from lakegate.errors import InvalidArgument

        self._require_on_dataset(name, "write")
        if self.dataset_kind(name) != "lance":
            raise InvalidArgument(
                f"{name} is a table, not a dataset of documents.", hint="Append rows to tables with append_rows."
            )
        for classification in sorted({d.classification for d in documents}):
            obj = classification_resource(name, classification)
            decision = self.decide(obj, "read")
            if not decision.allowed:
                self.touched.append(Touched("classification", obj, "denied"))
                raise PolicyDenied(
                    f"Principal '{self.principal.name}' may not label documents '{classification}' in {name}: "
                    f"it may not read that classification itself ({decision.rule_text}). Nothing was written.",
                    hint="Use a classification you may read, or ask a data steward.",
                    rule=list(decision.rule),
                )
        doc_ids = [d.doc_id for d in documents]
        access = access_predicate(*self._document_access(name))
        self._require_replaceable(name, doc_ids, access)

        def progress(done: int, total: int) -> None:
            self.report_progress(done, total, f"embedded {done} of {total} passages")

        outcome = ingest_documents(
            self._warehouse,
            name,
            documents,
            chunk_size=chunk_size,
            overlap=overlap,
            progress=progress,
            index_min_rows=self.settings.writes.vector_index_min_rows,
            before_write=lambda: self._require_replaceable(name, doc_ids, access),
        )
        self.record("dataset", name, "write", outcome.version)
        self.rows = outcome.rows
        self.details.update(
            operation="add_documents",
            dataset=name,
            version_before=outcome.version_before,
            version_after=outcome.version,
            doc_ids=outcome.doc_ids,
            chunks=outcome.chunks,
            replaced_chunks=outcome.replaced,
            chunk_size=chunk_size,
            overlap=overlap,
        )
        if outcome.vector_index_built:
            self.details["vector_index_built"] = True
        if outcome.vector_index_error:
            self.details["vector_index_error"] = outcome.vector_index_error
        return outcome
