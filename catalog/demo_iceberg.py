"""The demo's Iceberg tables: their layouts, and a writer that recreates them and appends batches.

Column documentation and table properties come from the catalog definitions (catalog/datasets.yaml),
so a table describes itself the way list_datasets and describe_dataset show it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa

from lakegate.catalog.definitions import CatalogDefinitions
from lakegate.catalog.warehouse import Warehouse, translate_errors

if TYPE_CHECKING:
    from pyiceberg.schema import Schema

__all__ = ["LAYOUTS", "IcebergWriter"]

# Columns as "name type", with "!" for required; Iceberg types are built lazily (import cost).
LAYOUTS: dict[str, str] = {
    "sales.customers": "customer_id long!, name string!, email string!, phone string, region string!, "
    "segment string!, signup_date date!, country string!",
    "sales.products": "product_id long!, sku string!, name string!, category string!, unit_price decimal(10;2)!, "
    "active boolean!",
    "sales.orders": "order_id long!, customer_id long!, order_ts timestamptz!, status string!, channel string!, "
    "region string!, total_amount decimal(12;2)!",
    "sales.order_items": "order_id long!, line_number int!, product_id long!, quantity int!, "
    "unit_price decimal(10;2)!, discount decimal(10;2)!",
    "finance.payments": "payment_id long!, order_id long!, paid_ts timestamptz!, method string!, "
    "amount decimal(12;2)!, card_last4 string",
    "finance.refunds": "refund_id long!, order_id long!, refunded_ts timestamptz!, amount decimal(12;2)!, "
    "reason string!",
    "support.tickets": "ticket_id long!, customer_id long!, opened_ts timestamptz!, closed_ts timestamptz, "
    "priority string!, status string!, subject string!, body string!",
}
_MONTHLY = {"sales.orders": "order_ts"}


def _iceberg_schema(name: str, definitions: CatalogDefinitions) -> Schema:
    from pyiceberg.schema import Schema
    from pyiceberg.types import (
        BooleanType,
        DateType,
        DecimalType,
        IntegerType,
        LongType,
        NestedField,
        PrimitiveType,
        StringType,
        TimestamptzType,
    )

    simple: dict[str, PrimitiveType] = {
        "long": LongType(),
        "int": IntegerType(),
        "string": StringType(),
        "date": DateType(),
        "boolean": BooleanType(),
        "timestamptz": TimestamptzType(),
        "decimal(10;2)": DecimalType(10, 2),
        "decimal(12;2)": DecimalType(12, 2),
    }
    doc = definitions.dataset(name)
    fields = []
    for field_id, spec in enumerate(LAYOUTS[name].split(", "), start=1):
        column, type_name = spec.rstrip("!").split(" ")
        required = spec.endswith("!")
        column_doc = doc.column(column) if doc else None
        fields.append(
            NestedField(
                field_id=field_id,
                name=column,
                field_type=simple[type_name],
                required=required,
                doc=column_doc.description if column_doc else None,
            )
        )
    return Schema(*fields)


class IcebergWriter:
    """Creates the demo tables (dropping earlier ones) and appends Arrow tables to them."""

    def __init__(self, warehouse: Warehouse, definitions: CatalogDefinitions, *, note: str) -> None:
        self._warehouse = warehouse
        self._definitions = definitions
        self._note = note
        self._arrow: dict[str, pa.Schema] = {}
        self.rows: dict[str, int] = {}

    def recreate_tables(self) -> None:
        """Drop (with their files) and create every demo Iceberg table.

        Raises:
            BackendError: the catalog refused.
        """
        from pyiceberg.partitioning import PartitionField, PartitionSpec
        from pyiceberg.transforms import MonthTransform

        catalog = self._warehouse.iceberg
        for name in LAYOUTS:
            with translate_errors(f"create demo table {name}", name):
                namespace = name.split(".")[0]
                catalog.create_namespace_if_not_exists(namespace)
                if catalog.table_exists(name):
                    # purge, not drop: a plain drop leaves the old data files in the warehouse.
                    catalog.purge_table(name)
                schema = _iceberg_schema(name, self._definitions)
                spec = PartitionSpec()
                if name in _MONTHLY:
                    source = schema.find_field(_MONTHLY[name])
                    spec = PartitionSpec(
                        PartitionField(
                            source_id=source.field_id,
                            field_id=1000,
                            transform=MonthTransform(),
                            name=f"{source.name}_month",
                        )
                    )
                table = catalog.create_table(
                    name, schema=schema, partition_spec=spec, properties=self._properties(name)
                )
                self._arrow[name] = table.schema().as_arrow()
                self.rows[name] = 0

    def _properties(self, name: str) -> dict[str, str]:
        properties = {"lakegate.generated-by": self._note}
        doc = self._definitions.dataset(name)
        if doc is not None:
            properties |= {"comment": doc.description, "owner": doc.owner, "tags": ",".join(doc.tags)}
        return properties

    def append(self, name: str, columns: dict[str, pa.Array]) -> None:
        """Append one batch (one snapshot); columns are cast to the table's Arrow schema.

        Raises:
            BackendError: the write failed.
        """
        schema = self._arrow[name]
        arrays = [columns[f.name].cast(f.type) for f in schema]
        batch = pa.Table.from_arrays(arrays, schema=schema)
        with translate_errors(f"append to {name}", name):
            self._warehouse.iceberg_table(name).append(batch)
        self.rows[name] += batch.num_rows
