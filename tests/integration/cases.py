"""The parser cases of tests/cases/*.txt as data (the format is described in
the header of tests/cases/requests.txt; tests/unit/test_http.c reads the
same files)."""

import os
import re

CASES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cases")
STATUSES = (400, 413, 414, 417, 431, 501, 505)
NAME_RE = re.compile(r"^[a-z0-9-]+$")
SIMPLE_ESCAPES = {"r": b"\r", "n": b"\n", "t": b"\t", "0": b"\0", "\\": b"\\"}


class CaseError(ValueError):
    pass


class Case:
    def __init__(self, name, line):
        self.name = name
        self.line = line          # where it starts in the file
        self.expect = None        # "ok" or an int status
        self.method = None        # ok: what the upstream gets
        self.target = None
        self.body = b""
        self.headers = []         # ok: [(name, value bytes)] the upstream gets
        self.data = b""           # the request bytes

    @property
    def ok(self):
        return self.expect == "ok"

    def __repr__(self):
        return "Case(%s, %s)" % (self.name, self.expect)


def unescape(text, where="TEXT"):
    """Decodes the escapes of a TEXT (see the file header) into bytes."""
    out = bytearray()
    i = 0
    while i < len(text):
        c = text[i]
        if c != "\\":
            out += c.encode("utf-8")
            i += 1
            continue
        if i + 1 >= len(text):
            raise CaseError("%s: a lone backslash at the end" % where)
        e = text[i + 1]
        if e in SIMPLE_ESCAPES:
            out += SIMPLE_ESCAPES[e]
            i += 2
        elif e == "x":
            hh = text[i + 2:i + 4]
            if not re.fullmatch(r"[0-9a-fA-F]{2}", hh):
                raise CaseError("%s: \\x needs two hex digits" % where)
            out.append(int(hh, 16))
            i += 4
        elif e == "*":
            m = re.match(r"\\\*([0-9]+)\{([^}]*)\}", text[i:])
            if not m:
                raise CaseError("%s: malformed \\*N{TEXT}" % where)
            inner = m.group(2)
            if "\\*" in inner:
                raise CaseError("%s: nested \\*" % where)
            out += unescape(inner, where) * int(m.group(1))
            i += m.end()
        else:
            raise CaseError("%s: unknown escape \\%s" % (where, e))
    return bytes(out)


def parse(text, source="<cases>"):
    """Parses the text of a cases file into a list of Case."""
    cases = []
    names = set()
    cur = None

    def finish(case):
        if case is None:
            return
        where = "%s:%d: case %s" % (source, case.line, case.name)
        if case.expect is None:
            raise CaseError("%s: no expect line" % where)
        if not case.data:
            raise CaseError("%s: no request bytes" % where)
        if case.ok and case.method is None:
            raise CaseError("%s: an ok case needs a forward line" % where)
        cases.append(case)

    for no, line in enumerate(text.split("\n"), 1):
        where = "%s:%d" % (source, no)
        if line.endswith("\r"):
            raise CaseError("%s: CR in the file itself; escape it" % where)
        if line == "" or line.startswith("#"):
            continue
        if line.startswith("> "):
            if cur is None:
                raise CaseError("%s: bytes outside a case" % where)
            if line[-1] in " \t":
                raise CaseError("%s: trailing whitespace; write \\x20 or \\t" % where)
            cur.data += unescape(line[2:], where)
            continue
        keyword, _, rest = line.partition(" ")
        if keyword == "case":
            finish(cur)
            if not NAME_RE.match(rest) or rest in names:
                raise CaseError("%s: bad or repeated case name %r" % (where, rest))
            names.add(rest)
            cur = Case(rest, no)
            continue
        if cur is None:
            raise CaseError("%s: %r outside a case" % (where, keyword))
        if keyword == "expect":
            if rest == "ok":
                cur.expect = "ok"
            elif rest.isdigit() and int(rest) in STATUSES:
                cur.expect = int(rest)
            else:
                raise CaseError("%s: expect ok or one of %s" % (where, STATUSES))
        elif keyword in ("forward", "body", "header"):
            if cur.expect != "ok":
                raise CaseError("%s: %s only after 'expect ok'" % (where, keyword))
            if keyword == "forward":
                method, _, target = rest.partition(" ")
                if not method or not target:
                    raise CaseError("%s: forward METHOD TARGET" % where)
                cur.method, cur.target = method, unescape(target, where).decode("latin-1")
            elif keyword == "body":
                cur.body = unescape(rest, where)
            else:
                name, colon, value = rest.partition(":")
                if not colon or not name:
                    raise CaseError("%s: header NAME: VALUE" % where)
                cur.headers.append((name, unescape(value.strip(" "), where)))
        else:
            raise CaseError("%s: unknown line %r" % (where, line))
    finish(cur)
    return cases


def load(name="requests.txt"):
    path = os.path.join(CASES_DIR, name)
    with open(path, encoding="utf-8") as f:
        return parse(f.read(), path)
