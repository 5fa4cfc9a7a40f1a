"""The extraction tasks of benchmarks/structured.py: 16 JSON schemas, each with a text to extract from.

Shaped like the schemas extraction jobs send (OpenAI strict mode: every property required, no
extra properties): nested objects, arrays of objects, enums, integer and number ranges, date and
code patterns, booleans. Free-text fields carry a `maxLength` and arrays a `maxItems`, as a careful
client's do, so a constrained answer fits in the benchmark's `max_tokens`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# [0-9], not \d: llama-cpp-python's schema-to-grammar converter (0.3.36) turns \d into a grammar
# that llama.cpp cannot parse, and both engines must take the same schemas.
DATE = {"type": "string", "pattern": r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}
CURRENCY = {"type": "string", "enum": ["USD", "EUR", "GBP", "JPY"]}


def text(max_length: int = 40) -> dict[str, Any]:
    return {"type": "string", "maxLength": max_length}


def obj(**props: Any) -> dict[str, Any]:
    """A strict object: every property required, nothing else allowed."""
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def array(items: dict[str, Any], max_items: int = 4) -> dict[str, Any]:
    return {"type": "array", "items": items, "maxItems": max_items}


def integer(lo: int, hi: int) -> dict[str, Any]:
    return {"type": "integer", "minimum": lo, "maximum": hi}


def number(lo: float, hi: float) -> dict[str, Any]:
    return {"type": "number", "minimum": lo, "maximum": hi}


def enum(*values: str) -> dict[str, Any]:
    return {"type": "string", "enum": list(values)}


@dataclass(frozen=True)
class Case:
    name: str
    schema: dict[str, Any]
    source: str  # the text the answer is extracted from

    def schema_json(self) -> str:
        return json.dumps(self.schema, separators=(",", ":"))

    def prompt(self) -> str:
        """The user message: the same for every engine, constrained or not (the schema is in the
        prompt, so an unconstrained answer knows what is asked of it)."""
        return (f"Extract the {self.name.replace('_', ' ')} from the text below as a JSON object that matches "
                f"this JSON schema:\n{self.schema_json()}\n\nText: {self.source}\n\n"
                "Answer with the JSON object only.")


CASES: list[Case] = [
    Case("invoice", obj(
        invoice_number=text(20), date=DATE, vendor=obj(name=text(), country=text(30)),
        items=array(obj(description=text(), quantity=integer(1, 1000), unit_price=number(0, 100000)), 3),
        currency=CURRENCY, total=number(0, 1000000)),
        "Invoice INV-2291 dated 2024-03-14 from Northwind Traders (Germany). 3 oak chairs at 120.00 EUR each "
        "and 1 oak table at 450.00 EUR. Total due: 810.00 EUR."),
    Case("person", obj(
        name=text(), age=integer(0, 120), email=text(60), occupation=text(),
        address=obj(city=text(30), country=text(30))),
        "Maria Lopez, 34, works as a civil engineer in Valencia, Spain. You can reach her at "
        "maria.lopez@example.com."),
    Case("event", obj(
        title=text(60), date=DATE, start_time={"type": "string", "pattern": r"^[0-9]{2}:[0-9]{2}$"},
        kind=enum("meeting", "conference", "party", "webinar"), location=obj(venue=text(), city=text(30)),
        speakers=array(text(), 3)),
        "PyData Lisbon will take place on 2024-10-05 at the Congress Center in Lisbon, starting at 09:30. "
        "Talks by Ana Silva and Tom Berg."),
    Case("product", obj(
        name=text(60), sku=text(20), price=number(0, 100000), currency=CURRENCY, in_stock={"type": "boolean"},
        dimensions=obj(width_cm=number(0, 1000), height_cm=number(0, 1000), depth_cm=number(0, 1000)),
        tags=array(text(20), 3)),
        "The Aurora desk lamp (SKU AL-300) costs 49.99 USD and is in stock. It measures 15 cm wide, 45 cm high "
        "and 15 cm deep. Tags: lighting, office, LED."),
    Case("job_posting", obj(
        title=text(60), company=text(), city=text(30), remote={"type": "boolean"},
        seniority=enum("junior", "mid", "senior", "lead"),
        salary=obj(min=integer(0, 1000000), max=integer(0, 1000000), currency=CURRENCY)),
        "Acme Robotics is hiring a Senior Backend Engineer in Boston. Remote work is possible. "
        "Salary between 140000 and 170000 USD."),
    Case("recipe", obj(
        name=text(60), servings=integer(1, 20), prep_minutes=integer(0, 600),
        ingredients=array(obj(item=text(30), amount=text(20)), 4),
        vegetarian={"type": "boolean"}),
        "Tomato soup for 4 people, ready in 30 minutes: 1 kg tomatoes, 1 onion, 2 cloves garlic and "
        "500 ml vegetable stock. No meat."),
    Case("flight_booking", obj(
        passenger=text(), origin={"type": "string", "pattern": r"^[A-Z]{3}$"},
        destination={"type": "string", "pattern": r"^[A-Z]{3}$"}, date=DATE,
        cabin=enum("economy", "premium_economy", "business", "first"), seats=integer(1, 9)),
        "Book 2 business class seats for John Carter from JFK to LHR on 2024-12-20."),
    Case("support_ticket", obj(
        customer=text(), product=text(), priority=enum("low", "medium", "high", "urgent"),
        category=enum("billing", "bug", "feature_request", "account"),
        sentiment=enum("positive", "neutral", "negative"),
        summary=text(100)),
        "From Priya Shah: the PhotoSync app crashes every time I upload more than 10 pictures. I need this "
        "fixed today, my client is waiting. Very frustrated."),
    Case("movie_review", obj(
        title=text(60), year=integer(1900, 2030), rating=number(0, 10), recommend={"type": "boolean"},
        pros=array(text(40), 3), cons=array(text(40), 3)),
        "I watched The Silent Harbor (2019) last night: gorgeous photography and a great score, but the "
        "plot drags in the middle. 7.5 out of 10, worth seeing."),
    Case("postal_address", obj(
        recipient=text(), street=text(60), city=text(30), postal_code=text(12),
        country_code={"type": "string", "pattern": r"^[A-Z]{2}$"}),
        "Please ship it to Kenji Watanabe, 3-1-1 Marunouchi, Tokyo 100-0005, Japan."),
    Case("meeting_notes", obj(
        date=DATE, participants=array(text(30), 4), decisions=array(text(60), 3),
        action_items=array(obj(owner=text(30), task=text(60)), 3)),
        "Meeting on 2024-05-02 with Alice, Bob and Chen. We decided to ship version 2.0 in June. "
        "Alice will update the docs; Bob will fix the login bug."),
    Case("prescription", obj(
        medication=text(), dose_mg=number(0, 5000),
        frequency=enum("once_daily", "twice_daily", "three_times_daily", "as_needed"),
        route=enum("oral", "topical", "injection", "inhaled"), duration_days=integer(1, 365)),
        "Amoxicillin 500 mg, taken by mouth twice a day for 7 days."),
    Case("real_estate_listing", obj(
        type=enum("apartment", "house", "studio", "townhouse"), city=text(30), price=integer(0, 100000000),
        currency=CURRENCY, bedrooms=integer(0, 10), bathrooms=integer(0, 10), area_m2=number(0, 10000),
        features=array(text(30), 4)),
        "Bright 3-bedroom apartment in Manchester with 2 bathrooms, 95 square meters, a balcony and parking. "
        "Asking price 285000 GBP."),
    Case("shipment", obj(
        tracking_number=text(24), carrier=enum("DHL", "UPS", "FedEx", "USPS"),
        status=enum("label_created", "in_transit", "out_for_delivery", "delivered"),
        origin=obj(city=text(30), country=text(30)), destination=obj(city=text(30), country=text(30)),
        weight_kg=number(0, 1000)),
        "Your UPS package 1Z999AA10123456784 (2.4 kg) shipped from Chicago, USA is out for delivery in "
        "Toronto, Canada."),
    Case("bank_transaction", obj(
        date=DATE, amount=number(0, 1000000), currency=CURRENCY, merchant=text(),
        category=enum("groceries", "travel", "dining", "utilities", "other"), direction=enum("debit", "credit")),
        "On 2024-07-19 you paid 62.30 EUR at Carrefour Market with your debit card."),
    Case("company_profile", obj(
        name=text(), founded=integer(1800, 2030), employees=integer(1, 5000000),
        industry=enum("software", "retail", "energy", "finance", "healthcare"), public={"type": "boolean"},
        headquarters=obj(city=text(30), country=text(30))),
        "Helio Grid, founded in 2011, is a privately held energy company headquartered in Oslo, Norway, "
        "with about 850 employees."),
]
