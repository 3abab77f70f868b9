"""The profile columns a segment may use, with their types (DESIGN §4.2).

These types drive the compiler's checks and the ClickHouse `customer_profiles` DDL, so the
stream and ClickHouse see the same columns.
"""

from __future__ import annotations

from enum import StrEnum


class T(StrEnum):
    NUM = "number"
    STR = "string"
    BOOL = "boolean"
    DT = "datetime"
    ARR = "array of strings"
    MAP = "map of string to number"
    NULL = "NULL"
    ANY = "any"


# column -> (type, nullable, ClickHouse type)
PROFILE_COLUMNS: dict[str, tuple[T, bool, str]] = {
    "customer_id": (T.STR, False, "String"),
    "anonymous_ids": (T.ARR, False, "Array(String)"),
    "first_seen_at": (T.DT, True, "Nullable(DateTime64(3, 'UTC'))"),
    "last_seen_at": (T.DT, True, "Nullable(DateTime64(3, 'UTC'))"),
    "events_count": (T.NUM, False, "UInt64"),
    "sessions_count": (T.NUM, False, "UInt64"),
    "page_views_count": (T.NUM, False, "UInt64"),
    "product_views_count": (T.NUM, False, "UInt64"),
    "cart_adds_count": (T.NUM, False, "UInt64"),
    "orders_count": (T.NUM, False, "UInt64"),
    "lifetime_value": (T.NUM, False, "Float64"),
    "avg_order_value": (T.NUM, False, "Float64"),
    "first_purchase_at": (T.DT, True, "Nullable(DateTime64(3, 'UTC'))"),
    "last_purchase_at": (T.DT, True, "Nullable(DateTime64(3, 'UTC'))"),
    "orders_30d": (T.NUM, False, "Int64"),
    "orders_90d": (T.NUM, False, "Int64"),
    "orders_365d": (T.NUM, False, "Int64"),
    "spend_30d": (T.NUM, False, "Float64"),
    "spend_90d": (T.NUM, False, "Float64"),
    "spend_365d": (T.NUM, False, "Float64"),
    "category_affinity": (T.MAP, False, "Map(String, Float64)"),
    "top_category": (T.STR, True, "Nullable(String)"),
    "preferred_channel": (T.STR, True, "Nullable(String)"),
    "email_opens_count": (T.NUM, False, "UInt64"),
    "email_clicks_count": (T.NUM, False, "UInt64"),
    "unsubscribed": (T.BOOL, False, "Bool"),
    "open_tickets_count": (T.NUM, False, "UInt64"),
    "support_sentiment": (T.NUM, True, "Nullable(Float64)"),
    "nps": (T.NUM, True, "Nullable(Int64)"),
    "nps_at": (T.DT, True, "Nullable(DateTime64(3, 'UTC'))"),
    "survey_interests": (T.ARR, False, "Array(String)"),
    "survey_motivations": (T.ARR, False, "Array(String)"),
    "surveys_count": (T.NUM, False, "UInt64"),
    "loyalty_tier": (T.STR, True, "Nullable(String)"),
    "consent_marketing": (T.BOOL, True, "Nullable(Bool)"),
    "segments": (T.ARR, False, "Array(String)"),
    "version": (T.NUM, False, "UInt64"),
    "updated_at": (T.DT, False, "DateTime64(3, 'UTC')"),
}
