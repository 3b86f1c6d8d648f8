"""Names the session-state rules trust: statement kinds and functions that leave nothing on the
server connection.

Anything not listed here counts as "could not judge", and a connection that ran it is reset
when it comes back to the pool (see docs/settings.md, "Session reset"). A name missing from
these lists therefore costs one reset, never a dirty session, which is why they only need to
cover what applications send often, not all of PostgreSQL.
"""

from __future__ import annotations

from typing import Final

__all__ = ["PLAIN_STATEMENTS", "TRUSTED_CALLS"]

#: First keywords of statements that, apart from the functions they call (judged separately)
#: and the forms the rules flag (SELECT INTO TEMP...), change nothing in the session.
#: Not here: DO and CALL (run code nobody can see), LOAD (loads a library into the session).
PLAIN_STATEMENTS: Final = frozenset(
    {
        "select", "insert", "update", "delete", "merge", "with", "values", "table",
        "begin", "start", "commit", "end", "rollback", "abort", "savepoint", "release",
        "show", "fetch", "move", "close", "notify", "lock", "truncate", "copy", "explain",
        "analyze", "analyse", "vacuum", "refresh", "reindex", "cluster", "checkpoint",
        "comment", "grant", "revoke", "alter", "drop", "create", "discard", "security",
        "import", "reassign",
    }
)  # fmt: skip

# Keywords that a "(" may follow without any function being called.
_KEYWORDS: Final = frozenset(
    {
        "all", "and", "any", "array", "as", "between", "by", "case", "cast", "check",
        "collate", "conflict", "cube", "default", "distinct", "else", "except", "exists",
        "filter", "from", "group", "grouping", "having", "ilike", "in", "include",
        "intersect", "into", "is", "join", "key", "lateral", "like", "limit", "materialized",
        "not", "of", "offset", "on", "or", "order", "over", "partition", "primary", "range",
        "recursive", "returning", "rollup", "row", "rows", "select", "set", "sets", "similar",
        "some", "then", "to", "union", "unique", "using", "values", "when", "where", "window",
        "with", "within", "exclude", "ordinality", "explain", "vacuum", "analyze", "analyse",
        "copy", "btree", "hash", "gin", "gist", "brin", "spgist", "bernoulli", "system",
        "overlaps", "escape", "extract", "position", "substring", "overlay", "trim",
        "normalize", "coalesce", "nullif", "greatest", "least", "treat", "xmlelement",
        "xmlforest", "xmlattributes", "xmlparse", "xmlserialize", "xmlconcat", "xmlexists",
        "xmlagg", "json", "json_object", "json_array", "json_exists", "json_value",
        "json_query", "json_scalar", "json_serialize",
    }
)  # fmt: skip

# Type names used with a modifier or as a cast function: varchar(20), numeric(10, 2), int(x).
_TYPES: Final = frozenset(
    {
        "int", "int2", "int4", "int8", "integer", "smallint", "bigint", "numeric", "decimal",
        "real", "float", "float4", "float8", "double", "precision", "text", "varchar", "char",
        "character", "varying", "bpchar", "bool", "boolean", "date", "time", "timestamp",
        "timestamptz", "timetz", "interval", "bit", "varbit", "uuid", "jsonb", "bytea",
        "inet", "cidr", "macaddr", "money", "oid", "regclass", "regtype", "xml", "tsvector",
        "tsquery", "point", "int4range", "int8range", "numrange", "tsrange", "tstzrange",
        "daterange",
    }
)  # fmt: skip

# Built-in functions that read or compute without touching session state.
_FUNCTIONS: Final = frozenset(
    {
        # aggregates and window functions
        "count", "sum", "avg", "min", "max", "array_agg", "string_agg", "json_agg",
        "jsonb_agg", "json_object_agg", "jsonb_object_agg", "bool_and", "bool_or", "every",
        "bit_and", "bit_or", "stddev", "stddev_pop", "stddev_samp", "variance", "var_pop",
        "var_samp", "percentile_cont", "percentile_disc", "mode", "row_number", "rank",
        "dense_rank", "percent_rank", "cume_dist", "ntile", "lag", "lead", "first_value",
        "last_value", "nth_value", "corr", "covar_pop", "covar_samp", "regr_slope",
        # time
        "now", "clock_timestamp", "statement_timestamp", "transaction_timestamp",
        "timeofday", "date_trunc", "date_part", "date_bin", "age", "make_date", "make_time",
        "make_timestamp", "make_timestamptz", "make_interval", "to_char", "to_date",
        "to_timestamp", "to_number", "justify_days", "justify_hours", "justify_interval",
        "isfinite",
        # text
        "lower", "upper", "initcap", "length", "char_length", "character_length",
        "octet_length", "bit_length", "concat", "concat_ws", "format", "replace",
        "split_part", "substr", "strpos", "left", "right", "lpad", "rpad", "ltrim", "rtrim",
        "btrim", "reverse", "repeat", "translate", "ascii", "chr", "starts_with",
        "regexp_replace", "regexp_match", "regexp_matches", "regexp_like", "regexp_count",
        "regexp_instr", "regexp_substr", "regexp_split_to_array", "regexp_split_to_table",
        "md5", "sha224", "sha256", "sha384", "sha512", "encode", "decode", "quote_ident",
        "quote_literal", "quote_nullable", "string_to_array", "array_to_string",
        "string_to_table", "unaccent", "similarity", "word_similarity",
        # numbers
        "abs", "ceil", "ceiling", "floor", "round", "trunc", "mod", "power", "pow", "sqrt",
        "cbrt", "exp", "ln", "log", "log10", "sign", "div", "width_bucket", "random",
        "gcd", "lcm", "pi", "degrees", "radians", "sin", "cos", "tan", "atan", "atan2",
        "scale",
        # sequences, identifiers, uuids (nextval's currval is reset by DISCARD SEQUENCES too)
        "nextval", "currval", "setval", "lastval", "gen_random_uuid", "uuid_generate_v4",
        "uuid_generate_v1", "pg_get_serial_sequence",
        # json
        "to_json", "to_jsonb", "row_to_json", "array_to_json", "json_build_object",
        "jsonb_build_object", "json_build_array", "jsonb_build_array", "json_object_keys",
        "jsonb_object_keys", "jsonb_set", "jsonb_set_lax", "jsonb_insert", "jsonb_path_query",
        "jsonb_path_query_array", "jsonb_path_query_first", "jsonb_path_exists",
        "jsonb_path_match", "json_array_elements", "jsonb_array_elements",
        "json_array_elements_text", "jsonb_array_elements_text", "json_each", "jsonb_each",
        "json_each_text", "jsonb_each_text", "json_array_length", "jsonb_array_length",
        "json_typeof", "jsonb_typeof", "json_strip_nulls", "jsonb_strip_nulls",
        "jsonb_pretty", "json_extract_path", "jsonb_extract_path", "json_extract_path_text",
        "jsonb_extract_path_text", "json_populate_record", "jsonb_populate_record",
        "json_populate_recordset", "jsonb_populate_recordset", "json_to_record",
        "jsonb_to_record", "json_to_recordset", "jsonb_to_recordset",
        # arrays and sets
        "array_length", "array_position", "array_positions", "array_append",
        "array_prepend", "array_cat", "array_remove", "array_replace", "array_dims",
        "array_upper", "array_lower", "array_ndims", "array_fill", "cardinality", "unnest",
        "generate_series", "generate_subscripts", "isempty", "lower_inf", "upper_inf",
        "range_merge",
        # full text search
        "to_tsvector", "to_tsquery", "plainto_tsquery", "phraseto_tsquery",
        "websearch_to_tsquery", "ts_rank", "ts_rank_cd", "ts_headline", "setweight",
        # reading the catalog and the session
        "current_setting", "current_database", "current_schema", "current_schemas",
        "version", "pg_backend_pid", "txid_current", "pg_current_xact_id", "pg_typeof",
        "pg_sleep", "pg_notify", "pg_listening_channels", "pg_my_temp_schema",
        "pg_is_other_temp_schema", "pg_relation_size", "pg_total_relation_size",
        "pg_table_size", "pg_indexes_size", "pg_size_pretty", "pg_database_size",
        "has_table_privilege", "has_schema_privilege", "has_database_privilege",
        "has_column_privilege", "obj_description", "col_description", "format_type",
        "pg_get_expr", "pg_get_indexdef", "pg_get_constraintdef", "pg_get_viewdef",
        "pg_get_functiondef", "pg_get_userbyid", "pg_table_is_visible",
        "pg_type_is_visible", "pg_function_is_visible", "to_regclass", "to_regtype",
        "pg_encoding_to_char", "pg_postmaster_start_time", "pg_is_in_recovery",
        "pg_last_wal_replay_lsn", "pg_current_wal_lsn", "inet_server_addr",
        "inet_server_port", "pg_stat_get_activity", "pg_blocking_pids",
        "pg_cancel_backend", "pg_terminate_backend", "pg_try_advisory_xact_lock",
        "pg_advisory_xact_lock", "pg_advisory_xact_lock_shared",
        "pg_try_advisory_xact_lock_shared", "pg_advisory_unlock", "pg_advisory_unlock_shared",
        "pg_advisory_unlock_all",
    }
)  # fmt: skip

#: Names that may stand before "(" without calling anything that leaves session state.
TRUSTED_CALLS: Final = _KEYWORDS | _TYPES | _FUNCTIONS
