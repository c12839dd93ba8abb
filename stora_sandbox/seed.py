"""Generated operators, sites, contacts, orders and timeline records in Stora's wire shapes.

:class:`RecordFactory` builds records for one operator from a ``random.Random``, so the
same seed always yields the same ids, names and timestamps. ``seed_demo`` creates the
three demo operators with enough orders for several pages at the default page size.

Timeline records exist whatever the seed: the global source "Partner platform" and the
global templates in :data:`GLOBAL_TEMPLATES` (created by :func:`apply_seed`, also for
an empty sandbox), and one source of its own per operator (created with the operator).
Their ids are derived from fixed labels (:func:`stable_id`), so they are the same in
every run and after every reset.

Shapes follow shared/stora-api/resources.md and examples/orders-list-response.json;
related records appear as ``{"id": ...}`` stubs, as in unexpanded Stora responses.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from stora_sandbox.models import Operator, Resource
from stora_sandbox.store import Store

SEEDS = ("demo",)

# (name, subdomain, city, sites, contacts, orders); counts vary a little so each operator
# has a different last page.
DEMO_OPERATORS = (
    ("Leeds City Storage Ltd", "leeds-city-storage", "Leeds", 3, 20, 120),
    ("Bristol Box Rooms", "bristol-box-rooms", "Bristol", 2, 22, 125),
    ("Camden Self Store", "camden-self-store", "London", 3, 19, 118),
)
DEMO_START = datetime(2025, 1, 6, 8, 0, tzinfo=UTC)
DEMO_END = datetime(2025, 10, 1, 18, 0, tzinfo=UTC)

FIRST_NAMES = (
    "Priya",
    "Oliver",
    "Amelia",
    "Jack",
    "Isla",
    "Harry",
    "Ava",
    "George",
    "Mia",
    "Noah",
    "Sofia",
    "Leo",
    "Grace",
    "Arthur",
    "Freya",
    "Oscar",
    "Zara",
    "Theo",
    "Ruby",
    "Yusuf",
)
LAST_NAMES = (
    "Shah",
    "Smith",
    "Jones",
    "Taylor",
    "Brown",
    "Williams",
    "Wilson",
    "Evans",
    "Khan",
    "Thomas",
    "Roberts",
    "Walker",
    "Wright",
    "Hughes",
    "Patel",
    "Green",
    "Hall",
    "Wood",
)
STREETS = (
    "Wellington Street",
    "Harbour Road",
    "Station Approach",
    "Mill Lane",
    "Victoria Road",
    "Park Avenue",
    "Canal Wharf",
    "Church Street",
    "Queens Road",
    "Kings Parade",
)
SITE_SUFFIXES = ("Central", "North", "Riverside", "Park", "Docks", "Ring Road")
POSTCODE_AREAS = {"Leeds": "LS", "Bristol": "BS", "London": "NW"}
CITIES = ("Leeds", "Bristol", "London", "Manchester", "Glasgow", "Cardiff")
CONTACT_TYPES = ("domestic", "company", "student", "charity", "local_authority")
CONTACT_SOURCES = ("booking", "quotation_request", "phone", "walkin", "external_enquiry")
MARKETING_SOURCES = ("google_search", "recommendation", "used_before", "social_media", None)
USE_CASES = ("moving_home", "more_space", "business_needs", "refurb", "travelling", None)
ORDER_STATUSES = ("draft", "finalized", "completed", "completed", "cancelled")
UNIT_PRICES = (4500, 5999, 7500, 9900, 12900, 15500)

TIMELINE_EPOCH = datetime(2025, 1, 1, 9, 0, tzinfo=UTC)
GLOBAL_SOURCE = ("Partner platform", "https://partner.example.com")
# (name, message, custom variables, predefined variables); messages use the Liquid-style
# syntax of the docs' example (shared/stora-api/timeline.md §2).
GLOBAL_TEMPLATES = (
    (
        "Synced orders",
        "synced {{ order_count }} orders{% if global_context %} for {{ site }}{% endif %}.",
        ["order_count"],
        ["site"],
    ),
    ("Connected", "connected {{ app_name }} to Stora.", ["app_name"], []),
    (
        "Action performed",
        "{{ action_name }}{% if global_context %} for {{ contact }}{% endif %}.",
        ["action_name"],
        ["contact"],
    ),
    (
        "Sent campaign",
        "sent campaign '{{ campaign_name }}'{% if global_context %} for {{ contact }}{% endif %}.",
        ["campaign_name"],
        ["contact"],
    ),
)


def iso(moment: datetime) -> str:
    """Stora's timestamp format: ISO 8601 UTC, whole seconds, ``Z`` suffix."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def money(amount: int) -> dict[str, Any]:
    return {"amount": amount, "currency": "GBP", "formatted": f"£{amount / 100:,.2f}"}


class RecordFactory:
    """Builds and stores records for one operator, drawing every choice from ``rng``."""

    def __init__(self, store: Store, operator: Operator, city: str, rng: random.Random) -> None:
        self.store = store
        self.operator = operator
        self.city = city
        self.rng = rng

    def new_id(self, prefix: str) -> str:
        return f"{prefix}{self.rng.getrandbits(64):016x}"

    def _postcode(self) -> str:
        area = POSTCODE_AREAS.get(self.city, self.city[:2].upper())
        letters = "".join(self.rng.choice("ABDEFGHJLNPQRSTUWXY") for _ in range(2))
        return f"{area}{self.rng.randint(1, 28)} {self.rng.randint(1, 9)}{letters}"

    def _store(self, kind: str, data: dict[str, Any]) -> Resource:
        resource = Resource(
            kind=kind,
            id=data["id"],
            operator_id=self.operator.id,
            created_at=parse_time(data["created_at"]),
            updated_at=parse_time(data["updated_at"]),
            seq=self.store.next_resource_seq(),
            data=data,
        )
        self.store.add_resource(resource)
        return resource

    def site(self, created_at: datetime, index: int) -> Resource:
        suffix = SITE_SUFFIXES[index % len(SITE_SUFFIXES)]
        name = f"{self.city} {suffix}"
        weekday = {"status": "set_hours", "open": "07:00", "close": "21:00"}
        hours: dict[str, Any] = {
            day: dict(weekday) for day in ("monday", "tuesday", "wednesday", "thursday", "friday")
        }
        hours["saturday"] = self.rng.choice(
            [
                {"status": "twenty_four_hours"},
                {"status": "set_hours", "open": "08:00", "close": "18:00"},
            ]
        )
        hours["sunday"] = self.rng.choice([{"status": "closed"}, {"status": "twenty_four_hours"}])
        data = {
            "id": self.new_id("site_"),
            "access_hours": hours,
            "address": {
                "line_1": f"{self.rng.randint(1, 240)} {self.rng.choice(STREETS)}",
                "line_2": None,
                "city": self.city,
                "postal_code": self._postcode(),
            },
            "created_at": iso(created_at),
            "description": f"Drive-up and indoor units, {suffix.lower()} {self.city}",
            "directions": {
                "google_maps_url": f"https://maps.google.com/?q={name.replace(' ', '+')}"
            },
            "images": {"default": None},
            "name": name,
            "opened_at": iso(created_at.replace(hour=0, minute=0, second=0)),
            "phone": f"+44113{self.rng.randint(0, 9_999_999):07d}",
            "updated_at": iso(created_at + timedelta(days=self.rng.randint(0, 90))),
        }
        return self._store("site", data)

    def contact(self, created_at: datetime) -> Resource:
        first, last = self.rng.choice(FIRST_NAMES), self.rng.choice(LAST_NAMES)
        status = self.rng.choice(("lead", "customer", "customer", "churned"))
        data = {
            "id": self.new_id("con_"),
            "address": {
                "line_1": f"{self.rng.randint(1, 200)} {self.rng.choice(STREETS)}",
                "line_2": None,
                "city": self.city,
                "postal_code": self._postcode(),
                "state": None,
                "country_alpha2": "GB",
            },
            "company_registration_number": None,
            "created_at": iso(created_at),
            "email": f"{first}.{last}.{self.rng.randint(1, 999)}@example.com".lower(),
            "full_name": f"{first} {last}",
            "identity_check": {"required": False, "status": "not_attempted"},
            "marketing_source": self.rng.choice(MARKETING_SOURCES),
            "metadata": {},
            "phone_number": f"+447700{self.rng.randint(0, 999_999):06d}",
            "source": self.rng.choice(CONTACT_SOURCES),
            "status": status,
            "stripe_customer_id": f"cus_{self.rng.getrandbits(56):014x}",
            "tax_id": None,
            "tenancies_count": 0 if status == "lead" else self.rng.randint(1, 2),
            "type": self.rng.choice(CONTACT_TYPES),
            "updated_at": iso(created_at + timedelta(hours=self.rng.randint(0, 400))),
            "use_case": self.rng.choice(USE_CASES),
        }
        return self._store("contact", data)

    def order(
        self,
        created_at: datetime,
        *,
        site_id: str,
        contact_id: str | None,
        updated_at: datetime | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> Resource:
        """One order; ``overrides`` replace generated fields (e.g. ``status``, ``metadata``)."""
        status = self.rng.choice(ORDER_STATUSES)
        unit_price = self.rng.choice(UNIT_PRICES)
        protection = self.rng.choice((0, 500, 900))
        subtotal = unit_price + protection
        discount = subtotal // 10 if self.rng.random() < 0.2 else 0
        excluding_tax = subtotal - discount
        tax = excluding_tax // 5 if self.rng.random() < 0.5 else 0
        deposit = self.rng.choice((0, 5000))
        order_id = self.new_id("order_")
        completed = status == "completed"
        data: dict[str, Any] = {
            "id": order_id,
            "billing_period": self.rng.choice(("monthly", "monthly", "weekly")),
            "contact": {"id": contact_id} if contact_id else None,
            "contract_template": {"id": self.new_id("ctpl_")},
            "coupon": {"id": self.new_id("cpn_")} if discount else None,
            "created_at": iso(created_at),
            "email_notifications": {"booking_confirmation": True, "move_in_day": True},
            "line_items": [{"id": self.new_id("olitm_")} for _ in range(2 if protection else 1)],
            "metadata": {},
            "one_time_total": money(deposit),
            "one_time_total_excluding_tax": money(deposit),
            "payment_method": self.rng.choice(("card", "card", "bacs_debit")),
            "payment_url": (
                f"https://{self.operator.subdomain}.stora.test/checkout/{order_id}"
                if status == "finalized"
                else None
            ),
            "purchase_order_number": None,
            "site": {"id": site_id},
            "source": self.rng.choice(("public_api", "storefront", "backoffice")),
            "starts_at": iso(created_at + timedelta(days=self.rng.randint(1, 21))),
            "status": status,
            "subscription": {"id": self.new_id("sub_")} if completed else None,
            "subtotal": money(subtotal),
            "tax": money(tax),
            "tenancy": {"id": self.new_id("ten_")} if completed else None,
            "total": money(excluding_tax + tax),
            "total_discount": money(discount),
            "total_excluding_tax": money(excluding_tax),
            "updated_at": iso(updated_at or created_at),
        }
        if overrides:
            data.update({k: v for k, v in overrides.items() if k != "id"})
        return self._store("order", data)

    def populate(
        self, *, sites: int, contacts: int, orders: int, start: datetime, end: datetime
    ) -> None:
        """Create records with creation times spread between ``start`` and ``end``."""
        span = (end - start).total_seconds()

        def moment(low: float = 0.0) -> datetime:
            return start + timedelta(seconds=int(self.rng.uniform(low, 1.0) * span))

        site_ids = [self.site(moment(0.0) - timedelta(days=30), i).id for i in range(sites)]
        if orders and not site_ids:
            # Every order belongs to a site.
            site_ids.append(self.site(start - timedelta(days=30), 0).id)
        contact_ids = [self.contact(moment()).id for _ in range(contacts)]
        for _ in range(orders):
            created = moment()
            updated = min(end, created + timedelta(hours=self.rng.randint(0, 24 * 20)))
            self.order(
                created,
                site_id=self.rng.choice(site_ids),
                contact_id=self.rng.choice(contact_ids) if contact_ids else None,
                updated_at=updated,
            )


def stable_id(prefix: str, label: str) -> str:
    """``prefix`` plus 16 hex digits derived from ``label``: the same in every run."""
    return f"{prefix}{hashlib.sha256(f'stora_sandbox {label}'.encode()).hexdigest()[:16]}"


def application_public_id(client_id: str) -> str:
    """The ``app_…`` id Stora shows as ``creator.id`` for records an OAuth app created."""
    return stable_id("app_", f"application {client_id}")


def _timeline_record(
    store: Store, kind: str, operator_id: str | None, data: dict[str, Any]
) -> Resource:
    resource = Resource(
        kind=kind,
        id=data["id"],
        operator_id=operator_id,
        created_at=parse_time(data["created_at"]),
        updated_at=parse_time(data["updated_at"]),
        seq=store.next_resource_seq(),
        data=data,
    )
    store.add_resource(resource)
    return resource


def timeline_source_data(
    source_id: str, name: str, website_url: str, *, is_global: bool, at: datetime
) -> dict[str, Any]:
    """A timeline source in wire shape (id first, then fields alphabetically)."""
    return {
        "id": source_id,
        "created_at": iso(at),
        "global": is_global,
        "name": name,
        "updated_at": iso(at),
        "website_url": website_url,
    }


def seed_timeline_globals(store: Store) -> None:
    """The global timeline source and templates every operator sees."""
    name, url = GLOBAL_SOURCE
    source_id = stable_id("tsrc_", f"global source {name}")
    _timeline_record(
        store,
        "timeline_source",
        None,
        timeline_source_data(source_id, name, url, is_global=True, at=TIMELINE_EPOCH),
    )
    for index, (template_name, message, custom, predefined) in enumerate(GLOBAL_TEMPLATES):
        at = TIMELINE_EPOCH + timedelta(minutes=index)
        data = {
            "id": stable_id("aetpl_", f"global template {template_name}"),
            "created_at": iso(at),
            "global": True,
            "message": message,
            "name": template_name,
            "updated_at": iso(at),
            "variables": {"custom": list(custom), "predefined": list(predefined)},
        }
        _timeline_record(store, "timeline_template", None, data)


def add_operator_source(store: Store, operator: Operator) -> Resource:
    """The operator's own timeline source (``global: false``), e.g. its CRM."""
    data = timeline_source_data(
        stable_id("tsrc_", f"operator source {operator.id}"),
        f"{operator.name} CRM",
        f"https://crm.{operator.subdomain}.example.com",
        is_global=False,
        at=datetime.fromtimestamp(int(operator.created_at), UTC),
    )
    return _timeline_record(store, "timeline_source", operator.id, data)


def parse_time(value: str) -> datetime:
    """Parse a Stora ISO 8601 timestamp (``Z`` suffix allowed) to an aware datetime."""
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def create_operator(
    store: Store,
    *,
    name: str,
    subdomain: str,
    rng: random.Random,
    city: str | None = None,
    created_at: float | None = None,
    operator_id: str | None = None,
) -> tuple[Operator, RecordFactory]:
    """Register an operator and return it with a factory for its records."""
    operator = Operator(
        id=operator_id or f"opr_{rng.getrandbits(64):016x}",
        name=name,
        subdomain=subdomain,
        created_at=store.now() if created_at is None else created_at,
    )
    store.add_operator(operator)
    add_operator_source(store, operator)
    return operator, RecordFactory(store, operator, city or rng.choice(CITIES), rng)


def seed_demo(store: Store) -> list[Operator]:
    """The ``demo`` data set: three operators, deterministic across runs."""
    operators = []
    for index, (name, subdomain, city, sites, contacts, orders) in enumerate(DEMO_OPERATORS):
        rng = random.Random(f"stora_sandbox demo {subdomain}")
        operator, factory = create_operator(
            store,
            name=name,
            subdomain=subdomain,
            rng=rng,
            city=city,
            created_at=DEMO_START.timestamp() + index,
        )
        factory.populate(
            sites=sites, contacts=contacts, orders=orders, start=DEMO_START, end=DEMO_END
        )
        operators.append(operator)
    return operators


def apply_seed(store: Store, seed: str | None) -> None:
    """Load the global timeline records, then the named seed (None: nothing more).

    Raises:
        ValueError: unknown seed name (checked before anything is loaded).
    """
    if seed is not None and seed not in SEEDS:
        raise ValueError(f"unknown seed {seed!r}; known: {', '.join(SEEDS)}")
    seed_timeline_globals(store)
    if seed is not None:
        seed_demo(store)
