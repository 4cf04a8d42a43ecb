"""The demo's Iceberg rows: customers, products, and orders with their items, payments, refunds and
support tickets, drawn from seeded NumPy generators.

The same generator state always gives the same rows. The words come from package data
(catalog/demo_vocabulary.yaml, catalog/demo_tickets.yaml, catalog/demo_injections.yaml); the
distributions (regions, statuses, seasonality, prices) are here. The data is internally consistent:
orders belong to existing customers and never predate the customer's signup; an order's total is the
sum of its lines; every order that was not cancelled has one payment for its total; refunds exist only
for returned orders and never exceed the order total; tickets are opened by a customer after one of
their orders.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from lakegate.catalog.demo_data import TicketTemplates, injections, ticket_templates, vocabulary

__all__ = [
    "CHANNELS",
    "COUNTRIES",
    "DAY_US",
    "END_US",
    "HOUR_US",
    "Customers",
    "Ids",
    "OrderBatch",
    "Products",
    "generate_customers",
    "generate_products",
    "order_batch",
    "timestamps",
]

IntArray = npt.NDArray[np.int64]
Rng = np.random.Generator

DAY_US = 86_400_000_000
HOUR_US = 3_600_000_000
_START_US = 1_704_067_200_000_000  # 2024-01-01T00:00:00Z
_DAYS = 731  # 2024-01-01 .. 2025-12-31
END_US = _START_US + _DAYS * DAY_US
_EPOCH_DAY_2021 = 18_628  # 2021-01-01 as days since 1970-01-01
_EPOCH_DAY_2024 = 19_723  # 2024-01-01


# -- Arrow helpers -----------------------------------------------------------------------------


def _money(cents: IntArray, precision: int = 12) -> pa.Array:
    """Exact decimal(precision, 2) values from integer cents (no float rounding on the way)."""
    # Arrow stores decimal128 as little-endian 128-bit integers: the cents in the low word and
    # the sign extension in the high word.
    words = np.empty((len(cents), 2), dtype=np.int64)
    words[:, 0] = cents
    words[:, 1] = cents >> 63
    return pa.Array.from_buffers(pa.decimal128(precision, 2), len(cents), [None, pa.py_buffer(words)])


def timestamps(micros: IntArray, valid: npt.NDArray[np.bool_] | None = None) -> pa.Array:
    mask = None if valid is None else ~valid
    return pa.array(micros, pa.int64(), mask=mask).cast(pa.timestamp("us", tz="UTC"))


def _pick(words: Sequence[str], codes: npt.NDArray[np.integer]) -> pa.Array:
    """Strings words[codes], built without a Python loop."""
    dictionary = pa.DictionaryArray.from_arrays(pa.array(codes, pa.int32()), pa.array(words))
    return dictionary.cast(pa.string())


def _choice(rng: Rng, weights: Sequence[float], size: int) -> npt.NDArray[np.int64]:
    p = np.asarray(weights, dtype=np.float64)
    return rng.choice(len(p), size=size, p=p / p.sum())


# -- customers and products --------------------------------------------------------------------

_REGIONS = ("NA", "EMEA", "APAC", "LATAM")
_REGION_WEIGHTS = (0.38, 0.34, 0.18, 0.10)
# country code, calling code, weight within the region
COUNTRIES: dict[str, tuple[tuple[str, str, float], ...]] = {
    "NA": (("US", "1", 0.85), ("CA", "1", 0.15)),
    "EMEA": (
        ("GB", "44", 0.22),
        ("DE", "49", 0.2),
        ("FR", "33", 0.15),
        ("NL", "31", 0.08),
        ("ES", "34", 0.09),
        ("IT", "39", 0.09),
        ("SE", "46", 0.05),
        ("PL", "48", 0.05),
        ("AE", "971", 0.04),
        ("ZA", "27", 0.03),
    ),
    "APAC": (
        ("AU", "61", 0.3),
        ("JP", "81", 0.25),
        ("SG", "65", 0.12),
        ("IN", "91", 0.18),
        ("NZ", "64", 0.05),
        ("KR", "82", 0.1),
    ),
    "LATAM": (("BR", "55", 0.45), ("MX", "52", 0.3), ("AR", "54", 0.1), ("CL", "56", 0.08), ("CO", "57", 0.07)),
}
_SEGMENTS = ("consumer", "smb", "enterprise")
_MAIL = ("gmail.com", "outlook.com", "yahoo.com", "icloud.com", "proton.me", "gmx.de", "hotmail.com")
_COMPANY_MAIL = ("northwind.example", "contoso.example", "fabrikam.example", "initech.example", "globex.example")


@dataclass(frozen=True)
class Customers:
    columns: dict[str, pa.Array]
    region: npt.NDArray[np.int64]  # index into _REGIONS, per customer (customer_id = index + 1)
    signup_us: IntArray
    phone: list[str]
    first_name: list[str]
    weight: npt.NDArray[np.float64]  # how likely each customer is to order (a few order a lot)


def generate_customers(rng: Rng, count: int) -> Customers:
    """`count` customers (customer_id 1..count).

    Raises:
        ConfigurationError: catalog/demo_vocabulary.yaml is missing or malformed.
    """
    words = vocabulary()
    first_names, last_names = words.first_names, words.last_names
    ids = np.arange(1, count + 1, dtype=np.int64)
    first = rng.integers(0, len(first_names), count)
    last = rng.integers(0, len(last_names), count)
    region = _choice(rng, _REGION_WEIGHTS, count)
    segment = _choice(rng, (0.72, 0.21, 0.07), count)
    country = np.empty(count, dtype=object)
    calling = np.empty(count, dtype=object)
    for r, code in enumerate(_REGIONS):
        rows = np.flatnonzero(region == r)
        options = COUNTRIES[code]
        picked = _choice(rng, [w for _, _, w in options], len(rows))
        country[rows] = [options[i][0] for i in picked]
        calling[rows] = [options[i][1] for i in picked]
    # Three quarters of the accounts predate the order history; the rest sign up during it.
    early = rng.random(count) < 0.75
    signup_day = np.where(
        early,
        rng.integers(_EPOCH_DAY_2021, _EPOCH_DAY_2024, count),
        rng.integers(_EPOCH_DAY_2024, _EPOCH_DAY_2024 + _DAYS - 30, count),
    )
    digits = rng.integers(2 * 10**9, 10**10, count)  # ten digits, no leading 0 or 1
    mail = rng.integers(0, len(_MAIL), count)
    company = rng.integers(0, len(_COMPANY_MAIL), count)
    has_phone = rng.random(count) < 0.9
    names, emails, phones, firsts = [], [], [], []
    for i in range(count):
        given, family = first_names[first[i]], last_names[last[i]].replace("-", " ")
        names.append(f"{given} {family}")
        firsts.append(given)
        domain = _MAIL[mail[i]] if segment[i] == 0 else _COMPANY_MAIL[company[i]]
        local = f"{given}.{family}".lower().replace(" ", "").replace("-", "")
        emails.append(f"{local}{ids[i]}@{domain}")
        number = str(digits[i])
        phones.append(f"+{calling[i]} {number[:3]} {number[3:6]} {number[6:]}")
    columns = {
        "customer_id": pa.array(ids),
        "name": pa.array(names),
        "email": pa.array(emails),
        "phone": pa.array(phones, mask=~has_phone),
        "region": _pick(_REGIONS, region),
        "segment": _pick(_SEGMENTS, segment),
        "signup_date": pa.array(signup_day.astype(np.int32)).cast(pa.date32()),
        "country": pa.array(list(country), pa.string()),
    }
    return Customers(
        columns=columns,
        region=region,
        signup_us=signup_day.astype(np.int64) * DAY_US,
        phone=phones,
        first_name=firsts,
        weight=rng.gamma(0.8, 1.0, count),
    )


_EDITIONS = ("", "", "", " Pro", " Mini", " XL", " Lite", " 2")


@dataclass(frozen=True)
class Products:
    columns: dict[str, pa.Array]
    price_cents: IntArray
    name: list[str]
    weight: npt.NDArray[np.float64]  # popularity


def generate_products(rng: Rng, count: int) -> Products:
    """`count` products (product_id 1..count); product 1 carries the planted injection as its name.

    Raises:
        ConfigurationError: catalog/demo_vocabulary.yaml or demo_injections.yaml is missing or malformed.
    """
    words = vocabulary()
    brands = words.brands
    categories = [c.name for c in words.categories]
    category = rng.integers(0, len(categories), count)
    names, skus, prices = [], [], []
    for i in range(count):
        spec = words.categories[category[i]]
        nouns = spec.products
        noun = nouns[rng.integers(0, len(nouns))]
        names.append(f"{brands[rng.integers(0, len(brands))]} {noun}{_EDITIONS[rng.integers(0, len(_EDITIONS))]}")
        skus.append(f"{spec.sku_prefix}-{i + 1:05d}")
        # Log-uniform prices ending in .99, the way shops price things.
        dollars = int(np.exp(rng.uniform(np.log(spec.low_cents / 100), np.log(spec.high_cents / 100))))
        prices.append(max(dollars, 1) * 100 - 1)
    if names:
        names[0] = injections().product_name  # after the draws: every other value stays as seeded
    price_cents = np.asarray(prices, dtype=np.int64)
    columns = {
        "product_id": pa.array(np.arange(1, count + 1, dtype=np.int64)),
        "sku": pa.array(skus),
        "name": pa.array(names),
        "category": _pick(categories, category),
        "unit_price": _money(price_cents, 10),
        "active": pa.array(rng.random(count) < 0.9),
    }
    return Products(columns, price_cents, names, rng.pareto(1.5, count) + 0.1)


# -- orders and everything that hangs off them -------------------------------------------------

_STATUSES = ("placed", "shipped", "delivered", "cancelled", "returned")
_STATUS_WEIGHTS = (0.03, 0.05, 0.80, 0.05, 0.07)
CHANNELS = ("web", "store", "app")
_METHODS = ("card", "paypal", "bank_transfer", "gift_card")
_REASONS = ("damaged", "wrong_item", "not_as_described", "no_longer_needed", "late_delivery", "defective")
_PRIORITIES = ("low", "normal", "high", "urgent")
_TICKET_STATUSES = ("open", "pending", "solved", "closed")


def _day_weights() -> npt.NDArray[np.float64]:
    """Relative order volume of each day of 2024-2025."""
    dates = np.datetime64("2024-01-01") + np.arange(_DAYS)
    month = dates.astype("datetime64[M]").astype(np.int64) % 12 + 1
    day = (dates - dates.astype("datetime64[M]")).astype(np.int64) + 1
    weekday = (dates.astype(np.int64) + 3) % 7  # 1970-01-01 was a Thursday; 0 = Monday
    year_2025 = dates >= np.datetime64("2025-01-01")
    weights: npt.NDArray[np.float64] = np.ones(_DAYS)
    weights *= np.where(year_2025, 1.18, 1.0)  # growth
    weights *= np.where(weekday >= 5, 1.2, 1.0)
    weights *= np.where((month == 7) & (day >= 8) & (day <= 12), 1.6, 1.0)  # summer sale
    weights *= np.where((month == 11) & (day >= 20) | (month == 12) & (day <= 22), 1.9, 1.0)  # holidays
    weights *= np.where(month <= 2, 0.85, 1.0)  # post-holiday lull
    weights /= weights.sum()
    return weights


_HOUR_WEIGHTS = (1, 0.6, 0.4, 0.3, 0.3, 0.5, 1, 2, 3, 4, 4.5, 5, 6, 5.5, 5, 4.5, 4.5, 5, 6, 7, 7.5, 6.5, 4, 2)


@dataclass
class Ids:
    """Next identifier of each kind, carried across batches."""

    order: int = 100_001
    payment: int = 500_001
    refund: int = 900_001
    ticket: int = 1


@dataclass
class OrderBatch:
    tables: dict[str, dict[str, pa.Array]] = field(default_factory=dict)


def order_batch(rng: Rng, count: int, customers: Customers, products: Products, ids: Ids) -> OrderBatch:
    """`count` orders with their items, payments, refunds and tickets; `ids` moves past the ones used.

    Raises:
        ConfigurationError: catalog/demo_tickets.yaml or demo_injections.yaml is missing or malformed.
    """
    batch = OrderBatch()
    order_id = np.arange(ids.order, ids.order + count, dtype=np.int64)
    ids.order += count
    customer = rng.choice(len(customers.weight), size=count, p=customers.weight / customers.weight.sum())
    day = rng.choice(_DAYS, size=count, p=_day_weights())
    hour = _choice(rng, _HOUR_WEIGHTS, count)
    ts = _START_US + day * DAY_US + hour * HOUR_US + rng.integers(0, HOUR_US, count)
    # A customer who signed up during the period orders only after signing up.
    signup = customers.signup_us[customer]
    late = ts < signup
    ts[late] = signup[late] + (rng.random(late.sum()) * (END_US - signup[late])).astype(np.int64)
    status = _choice(rng, _STATUS_WEIGHTS, count)
    # Orders from the last week cannot have been delivered or returned yet.
    recent = ts > END_US - 7 * DAY_US
    status[recent & (status >= 2) & (status != 3)] = 1

    lines = 1 + _choice(rng, (0.45, 0.28, 0.15, 0.08, 0.04), count)
    starts = np.concatenate(([0], np.cumsum(lines)[:-1]))
    n_lines = int(lines.sum())
    owner = np.repeat(np.arange(count), lines)
    line_number = np.arange(n_lines) - np.repeat(starts, lines) + 1
    product = rng.choice(len(products.weight), size=n_lines, p=products.weight / products.weight.sum())
    quantity = 1 + _choice(rng, (0.7, 0.2, 0.07, 0.03), n_lines)
    price = products.price_cents[product]
    gross = quantity * price
    # One line in five carries a 5-20 % promotion, rounded to the cent.
    rate = np.where(rng.random(n_lines) < 0.2, rng.choice([5, 10, 15, 20], n_lines), 0)
    discount = (gross * rate + 50) // 100
    line_amount = gross - discount
    total = np.add.reduceat(line_amount, starts)

    batch.tables["sales.orders"] = {
        "order_id": pa.array(order_id),
        "customer_id": pa.array(customer.astype(np.int64) + 1),
        "order_ts": timestamps(ts),
        "status": _pick(_STATUSES, status),
        "channel": _pick(CHANNELS, _choice(rng, (0.55, 0.15, 0.30), count)),
        "region": _pick(_REGIONS, customers.region[customer]),
        "total_amount": _money(total),
    }
    batch.tables["sales.order_items"] = {
        "order_id": pa.array(order_id[owner]),
        "line_number": pa.array(line_number.astype(np.int32)),
        "product_id": pa.array(product.astype(np.int64) + 1),
        "quantity": pa.array(quantity.astype(np.int32)),
        "unit_price": _money(price, 10),
        "discount": _money(discount, 10),
    }

    paid = np.flatnonzero(status != 3)
    method = _choice(rng, (0.62, 0.2, 0.1, 0.08), len(paid))
    last4 = rng.integers(0, 10_000, len(paid))
    batch.tables["finance.payments"] = {
        "payment_id": pa.array(np.arange(ids.payment, ids.payment + len(paid), dtype=np.int64)),
        "order_id": pa.array(order_id[paid]),
        "paid_ts": timestamps(ts[paid] + rng.integers(30_000_000, 2 * HOUR_US, len(paid))),
        "method": _pick(_METHODS, method),
        "amount": _money(total[paid]),
        "card_last4": pa.array([f"{d:04d}" for d in last4], mask=method != 0),
    }
    ids.payment += len(paid)

    returned = np.flatnonzero(status == 4)
    # Most returns are refunded in full; the rest refund only the order's first line.
    partial = rng.random(len(returned)) < 0.3
    refund = np.where(partial, line_amount[starts[returned]], total[returned])
    batch.tables["finance.refunds"] = {
        "refund_id": pa.array(np.arange(ids.refund, ids.refund + len(returned), dtype=np.int64)),
        "order_id": pa.array(order_id[returned]),
        "refunded_ts": timestamps(ts[returned] + rng.integers(5 * DAY_US, 40 * DAY_US, len(returned))),
        "amount": _money(refund),
        "reason": _pick(_REASONS, _choice(rng, (0.3, 0.15, 0.2, 0.2, 0.05, 0.1), len(returned))),
    }
    ids.refund += len(returned)

    batch.tables["support.tickets"] = _tickets(
        rng, ids, order_id, customer, ts, status, product[starts], customers, products
    )
    return batch


def _tickets(
    rng: Rng,
    ids: Ids,
    order_id: IntArray,
    customer: npt.NDArray[np.int64],
    order_ts: IntArray,
    status: npt.NDArray[np.int64],
    first_product: npt.NDArray[np.int64],
    customers: Customers,
    products: Products,
) -> dict[str, pa.Array]:
    # Returned orders almost always cause a ticket; others now and then.
    chance = np.where(status == 4, 0.6, np.where(status == 3, 0.2, 0.08))
    rows = np.flatnonzero(rng.random(len(order_id)) < chance)
    n = len(rows)
    opened = order_ts[rows] + rng.integers(HOUR_US, 20 * DAY_US, n)
    ticket_status = _choice(rng, (0.08, 0.07, 0.25, 0.6), n)
    closed = opened + rng.integers(HOUR_US // 2, 10 * DAY_US, n)
    is_closed = ticket_status >= 2
    priority = _choice(rng, (0.25, 0.5, 0.2, 0.05), n)
    subjects, bodies = [], []
    variant = rng.integers(0, 1 << 30, n)
    templates = ticket_templates()
    for k, row in enumerate(rows):
        cust = int(customer[row])
        subject, body = _ticket_text(
            templates,
            int(status[row]),
            int(variant[k]),
            order=int(order_id[row]),
            product=products.name[int(first_product[row])],
            name=customers.first_name[cust],
            phone=customers.phone[cust],
        )
        subjects.append(subject)
        bodies.append(body)
    if ids.ticket == 1 and bodies:
        bodies[0] = injections().ticket_body  # ticket_id 1
    ticket_id = np.arange(ids.ticket, ids.ticket + n, dtype=np.int64)
    ids.ticket += n
    return {
        "ticket_id": pa.array(ticket_id),
        "customer_id": pa.array(customer[rows].astype(np.int64) + 1),
        "opened_ts": timestamps(opened),
        "closed_ts": timestamps(closed, valid=is_closed),
        "priority": _pick(_PRIORITIES, priority),
        "status": _pick(_TICKET_STATUSES, ticket_status),
        "subject": pa.array(subjects),
        "body": pa.array(bodies),
    }


def _ticket_text(templates: TicketTemplates, status: int, variant: int, **values: str | int) -> tuple[str, str]:
    """A subject and body by the order's status: returned (4), cancelled (3) or any other."""
    options = templates.returned if status == 4 else templates.cancelled if status == 3 else templates.other
    return options[variant % len(options)].fill(**values)
