#!/usr/bin/env python3
"""Checks recorded admin API exchanges against the OpenAPI document.

usage: openapi_check.py SPEC.yaml EXCHANGES.json

The document itself must be valid OpenAPI 3.1; every exchange's request body must match its operation's
request schema, and its status must be documented with a response body matching that response's schema;
every operation must have been answered with a success at least once, and 401 seen at least once.
Prints one line per problem and exits 1 if there is any.
"""
import json
import re
import sys

import yaml
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate as validate_spec


def resolve(node, root):
    """The node with every local $ref replaced by what it points at (the document has no cycles)."""
    if isinstance(node, dict):
        if "$ref" in node:
            target = root
            for part in node["$ref"].lstrip("#/").split("/"):
                target = target[part]
            return resolve(target, root)
        return {key: resolve(value, root) for key, value in node.items()}
    if isinstance(node, list):
        return [resolve(value, root) for value in node]
    return node


def main():
    spec_path, exchanges_path = sys.argv[1], sys.argv[2]
    with open(spec_path) as f:
        spec = yaml.safe_load(f)
    validate_spec(spec)
    resolved = resolve(spec, spec)
    base = re.sub(r"^https?://[^/]+", "", spec["servers"][0]["url"])

    operations = []
    for template, item in resolved["paths"].items():
        pattern = re.compile("^" + re.sub(r"\\{[a-z_]+\\}", "[^/]+", re.escape(template)) + "$")
        for method, operation in item.items():
            operations.append((method.upper(), pattern, template, operation))

    with open(exchanges_path) as f:
        exchanges = json.load(f)
    problems = []
    succeeded = set()
    saw_unauthorized = False
    for exchange in exchanges:
        method, path, status = exchange["method"], exchange["path"], str(exchange["status"])
        where = f"{method} {path} -> {status}"
        if not path.startswith(base):
            problems.append(f"{where}: not under {base}")
            continue
        relative = path[len(base):]
        matches = [op for op in operations if op[0] == method and op[1].match(relative)]
        if not matches:
            problems.append(f"{where}: no such operation in the document")
            continue
        _, _, template, operation = matches[0]
        if exchange.get("request") is not None:
            body = operation.get("requestBody", {}).get("content", {}).get("application/json")
            if body is None:
                problems.append(f"{where}: sent a body the document does not take")
            elif exchange.get("request_valid", True):
                errors = list(OAS31Validator(body["schema"]).iter_errors(exchange["request"]))
                problems += [f"{where}: request: {error.message}" for error in errors]
        response = operation["responses"].get(status)
        if response is None:
            problems.append(f"{where}: status {status} is not documented for {method} {template}")
            continue
        content = response.get("content", {}).get("application/json")
        if content is None:
            if exchange.get("response") is not None:
                problems.append(f"{where}: a body where the document has none")
        elif exchange.get("response") is None:
            problems.append(f"{where}: no JSON body where the document has one")
        else:
            errors = list(OAS31Validator(content["schema"]).iter_errors(exchange["response"]))
            problems += [f"{where}: response: {error.message}" for error in errors]
        if status == "401":
            saw_unauthorized = True
            if exchange.get("www_authenticate") != "Bearer":
                problems.append(f"{where}: 401 without WWW-Authenticate: Bearer")
        if status.startswith("2"):
            succeeded.add((method, template))

    for method, _, template, _ in operations:
        if (method, template) not in succeeded:
            problems.append(f"{method} {template}: never answered with a success")
    if not saw_unauthorized:
        problems.append("no request was refused with 401")
    for problem in problems:
        print(problem)
    print(f"{len(exchanges)} exchanges, {len(operations)} operations, {len(problems)} problems")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
