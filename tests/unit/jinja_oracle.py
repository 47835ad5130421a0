#!/usr/bin/env python3
"""The jinja2 oracle for kvr's Jinja subset (services/gateway/jinja.h).

Renders every case with Python's jinja2 configured exactly as Hugging Face
transformers' apply_chat_template configures it (ImmutableSandboxedEnvironment,
trim_blocks, lstrip_blocks, loopcontrols, tojson = json.dumps(ensure_ascii=
False), raise_exception, strftime_now) and with the C++ renderer (the driver
binary, one JSON case per line), and requires byte-identical output; where
jinja2 raises, the C++ renderer must fail too (raise_exception: with the same
message). Two suites:

  constructs  one small template per supported construct (and whitespace
              control, trim/lstrip edge cases)
  templates   every tests/data/chat_templates/*.jinja over --conversations
              generated conversations (system or not, 1..8 turns, unicode,
              quotes, braces, whitespace edges, non-alternating roles that
              make the template raise, add_generation_prompt both ways)

Exit status 0 when every case matches; 1 with the first mismatches printed.
"""
import argparse
import json
import os
import random
import subprocess
import sys

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment


def hf_environment():
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env


CONSTRUCTS = [
    ("{{ 'a' ~ 1 ~ none ~ true }}", {}),
    ("{{ 1 + 2 * 3 - 4 }}|{{ 7 // 2 }}|{{ -7 // 2 }}|{{ -7 % 3 }}|{{ 7 / 2 }}|{{ 2 ** 10 }}|{{ 4 / 2 }}", {}),
    ("{{ 1.5 }}|{{ 1e3 }}|{{ 0.1 + 0.2 }}|{{ 1e16 }}|{{ 1e-5 }}|{{ 100.0 }}|{{ -0.5 }}", {}),
    ("{{ [1, 'a', none, true, 1.5, {'k': [1]}] }}|{{ (1, 2) }}|{{ ('x',) }}", {}),
    ("{{ {'b': 1, 'a': 'x'} }}|{{ \"it's\" }}|{{ ['it\\'s'] }}", {}),
    ("{% if x %}T{% elif y %}E{% else %}F{% endif %}", {"x": 0, "y": "s"}),
    ("{% if x is defined %}d{% endif %}{% if z is not defined %}u{% endif %}{% if n is none %}N{% endif %}",
     {"x": 1, "n": None}),
    ("{% for x in xs %}{{ loop.index0 }}{{ loop.index }}{{ loop.first }}{{ loop.last }}{{ loop.length }}"
     "{{ loop.revindex }}{{ loop.revindex0 }}:{{ x }};{% endfor %}", {"xs": ["a", "b", "c"]}),
    ("{% for x in xs if x > 1 %}{{ x }}{{ loop.index }}{{ loop.last }},{% else %}empty{% endfor %}",
     {"xs": [1, 2, 3, 0, 5]}),
    ("{% for x in xs %}x{% else %}empty{% endfor %}", {"xs": []}),
    ("{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}{% for k, v in d|items %}{{ k }}{{ v }}{% endfor %}",
     {"d": {"z": 1, "a": 2}}),
    ("{% for x in xs %}{% if x == 2 %}{% continue %}{% endif %}{% if x == 4 %}{% break %}{% endif %}{{ x }}{% endfor %}",
     {"xs": [1, 2, 3, 4, 5]}),
    ("{% set x = 1 %}{% for i in [1, 2] %}{% set x = i %}{{ x }}{% endfor %}{{ x }}", {}),
    ("{% set ns = namespace(found=false, n=0) %}{% for i in [1, 2, 3] %}{% set ns.n = ns.n + i %}"
     "{% if i == 2 %}{% set ns.found = true %}{% endif %}{% endfor %}{{ ns.found }}{{ ns.n }}", {}),
    ("{% set a, b = 1, 2 %}{{ a }}{{ b }}{% set c %}block {{ a }}{% endset %}[{{ c }}]", {}),
    ("{{ s[::-1] }}|{{ s[1:] }}|{{ s[:2] }}|{{ s[-2:] }}|{{ xs[1:3] }}|{{ xs[::2] }}|{{ xs[-1] }}|{{ s[0] }}",
     {"s": "héllo", "xs": [1, 2, 3, 4, 5]}),
    ("{{ d.a }}|{{ d['a'] }}|{{ d.missing }}|{{ d.get('a') }}|{{ d.get('x', 'dflt') }}|{{ d.get('x') }}",
     {"d": {"a": "A"}}),
    ("{{ 'a' in 'cat' }}{{ 2 in [1, 2] }}{{ 'k' in d }}{{ 'q' not in d }}{{ 1 < 2 < 3 }}{{ 'a' < 'b' }}",
     {"d": {"k": 1}}),
    ("{{ x and y }}|{{ x or y }}|{{ not x }}|{{ none or 'z' }}|{{ 0 and 1 }}", {"x": "a", "y": ""}),
    ("{{ 'yes' if c else 'no' }}|{{ 'only' if c }}|{{ 'x' if not c else 'y' }}", {"c": False}),
    ("{{ s is string }}{{ d is mapping }}{{ xs is iterable }}{{ s is iterable }}{{ 3 is number }}"
     "{{ 3 is integer }}{{ 3.0 is float }}{{ true is boolean }}{{ 4 is even }}{{ 3 is odd }}"
     "{{ 9 is divisibleby 3 }}{{ 'a' is equalto 'a' }}{{ xs is sequence }}",
     {"s": "x", "d": {}, "xs": [1]}),
    ("[{{ s|trim }}]|{{ s|length }}|{{ s|upper }}|{{ s|lower }}|{{ s|title }}|{{ s|capitalize }}",
     {"s": "  hello World  "}),
    ("{{ xs|length }}|{{ xs|first }}|{{ xs|last }}|{{ xs|join(', ') }}|{{ xs|join }}|{{ xs|reverse|list }}"
     "|{{ xs|sort }}|{{ xs|unique|list }}|{{ xs|sort(reverse=true) }}", {"xs": [3, 1, 2, 1]}),
    ("{{ s|replace('a', 'b') }}|{{ s|replace('a', 'b', 1) }}|{{ x|default('d') }}|{{ e|default('d', true) }}"
     "|{{ e|default('d') }}|{{ 3|string }}|{{ '42'|int + 1 }}|{{ 'x'|int }}|{{ 2|float }}",
     {"s": "banana", "e": ""}),
    ("{{ d|tojson }}|{{ xs|tojson }}|{{ 'é\"\\n'|tojson }}|{{ none|tojson }}|{{ 1.0|tojson }}",
     {"d": {"b": [1, 2.5, None, True], "a": {"x": "y"}}, "xs": []}),
    ("{{ d|tojson(indent=4) }}|{{ d|tojson(indent=2) }}", {"d": {"b": [1, {"c": []}], "a": {}}}),
    ("{{ s.strip() }}|{{ s.lstrip() }}|{{ s.rstrip() }}|{{ 'xxaxx'.strip('x') }}|{{ s.startswith(' a') }}"
     "|{{ s.endswith('c ') }}|{{ s.split() }}|{{ 'a,b,,c'.split(',') }}|{{ 'a b c'.split(' ', 1) }}"
     "|{{ s.upper() }}|{{ 'hi there'.title() }}|{{ 'ab'.replace('a', 'x') }}",
     {"s": " a b c "}),
    ("{{ xs|selectattr('role', 'equalto', 'user')|list|length }}|{{ xs|rejectattr('role', 'equalto', 'user')"
     "|map(attribute='role')|join(',') }}|{{ [1, 2, 3]|select('odd')|list }}|{{ [1, 2, 3]|reject('odd')|list }}"
     "|{{ ['a', 'b']|map('upper')|join }}",
     {"xs": [{"role": "user"}, {"role": "assistant"}, {"role": "user"}]}),
    ("{% macro greet(name, punct='!') %}Hi {{ name }}{{ punct }}{% endmacro %}{{ greet('A') }} {{ greet('B', '?') }}"
     " {{ greet(name='C') }}", {}),
    ("{{ range(3)|list }}|{{ range(1, 7, 2)|list }}|{% for i in range(2) %}{{ i }}{% endfor %}", {}),
    ("{{ raise_exception('bad role: ' ~ r) }}", {"r": "tool"}),
    ("{# comment #}a\n{# another -#}   \n  b{#- trim -#}  c", {}),
    ("{% if true %}\n  yes\n{% endif %}\n  {% if true %}\nx\n  {% endif %}\n", {}),
    ("a  \n  {%- if true -%}  \n  b  \n  {%- endif -%}  \n  c", {}),
    ("a\n    {{ 'v' }}\n    {% for x in xs %}\n    - {{ x }}\n    {% endfor %}\nend\n", {"xs": [1, 2]}),
    ("{%+ if true %}  keep{% endif +%}\nnext", {}),
    ("  {% if true %}x{% endif %}  \n{% set y = 1 %}\n  \t{% if y %}\ty{% endif %}", {}),
    ("{{ '{{' }} {{ '}}' }} {{ {'a': {'b': 1}}['a']['b'] }} {{ \"%}\" }}", {}),
    ("line1\r\nline2\r{% if true %}\r\nx{% endif %}\n\n", {}),
    ("{{ 'a' 'b' }}{{ \"\\t\\x41\\u00e9\" }}{{ 'no\\escape' }}", {}),
    ("{{ messages[0].content }}|{{ messages[0]['role'] }}|{{ messages|length }}",
     {"messages": [{"role": "user", "content": "hi"}]}),
    ("{{ x.y }}", {}),
    ("{{ 'a' + 1 }}", {}),
    ("{% for %}", {}),
    ("{{ foo( }}", {}),
    ("{% if x %}unclosed", {"x": 1}),
    ("{{ [1, 2][5] }}|{{ d['k'] }}|{{ u }}|{{ u|length }}|{{ u is none }}|{{ u|default('z') }}", {"d": {}}),
    ("{{ true == 1 }}{{ 1 == 1.0 }}{{ none == none }}{{ [1] == [1] }}{{ {'a': 1} == {'a': 1} }}{{ 'a' != 'b' }}", {}),
    ("{{ xs[0] }}{% set xs = xs[1:] %}{{ xs }}{% for m in xs %}{% set xs = [] %}{{ xs }}{% endfor %}{{ xs }}",
     {"xs": [1, 2, 3]}),
]

UNICODE = ["é", "日本語", "🦙", "Ωmega", "\u00a0", "\u3000", "\u2028", "ß", "\u200b"]
PIECES = ["hello", "world", "'", '"', "{{", "}}", "{%", "%}", "{#", "\\", "\\n", "<|eot_id|>",
          "[INST]", "<s>", "  ", "\t", "\n", "\n\n", " ", "", "a b", "-", "%", "#", "{", "}",
          "1", "None", "true"]


def random_text(rng):
    n = rng.randint(0, 6)
    parts = []
    for _ in range(n):
        r = rng.random()
        if r < 0.25:
            parts.append(rng.choice(UNICODE))
        else:
            parts.append(rng.choice(PIECES))
    text = "".join(parts)
    if rng.random() < 0.2:
        text = rng.choice([" ", "\n", "\t ", "\u00a0", " \n "]) + text + rng.choice(["", " ", "\n\n"])
    return text


def random_conversation(rng):
    msgs = []
    if rng.random() < 0.5:
        msgs.append({"role": "system", "content": random_text(rng)})
    turns = rng.randint(1, 8)
    for i in range(turns):
        role = "user" if i % 2 == 0 else "assistant"
        if rng.random() < 0.07:  # breaks alternation: the strict templates raise
            role = rng.choice(["user", "assistant", "system"])
        msgs.append({"role": role, "content": random_text(rng)})
    return msgs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--render", help="render one case file {template, vars}; print "
                                     "'rendered: <JSON string>' (chat_template_e2e_test)")
    ap.add_argument("--driver")
    ap.add_argument("--templates", help="folder of *.jinja chat templates")
    ap.add_argument("--conversations", type=int, default=300, help="per template")
    ap.add_argument("--seed", type=int, default=19)
    args = ap.parse_args()

    env = hf_environment()
    if args.render:
        with open(args.render, encoding="utf-8") as f:
            case = json.load(f)
        text = env.from_string(case["template"]).render(**case["vars"])
        print("rendered: " + json.dumps(text), flush=True)
        return 0
    if not args.driver or not args.templates:
        ap.error("--driver and --templates are required")
    cases = []  # (name, template, vars)
    for i, (tpl, variables) in enumerate(CONSTRUCTS):
        cases.append((f"construct[{i}]", tpl, variables))
    rng = random.Random(args.seed)
    names = sorted(f for f in os.listdir(args.templates) if f.endswith(".jinja"))
    if not names:
        print(f"no *.jinja templates in {args.templates}", file=sys.stderr)
        return 1
    for name in names:
        with open(os.path.join(args.templates, name), encoding="utf-8") as f:
            tpl = f.read()
        for c in range(args.conversations):
            variables = {
                "messages": random_conversation(rng),
                "bos_token": rng.choice(["<s>", "<|begin_of_text|>", ""]),
                "eos_token": rng.choice(["</s>", "<|eot_id|>"]),
                "add_generation_prompt": c % 2 == 0,
                "tools": None,
                "documents": None,
            }
            cases.append((f"{name}[{c}]", tpl, variables))

    expected = []
    compiled = {}
    for name, tpl, variables in cases:
        try:
            if tpl not in compiled:
                compiled[tpl] = env.from_string(tpl)
            expected.append(("ok", compiled[tpl].render(**variables)))
        except jinja2.exceptions.TemplateSyntaxError as e:
            expected.append(("syntax", str(e)))
        except jinja2.exceptions.TemplateError as e:
            # raise_exception (TemplateError itself) or undefined / type errors.
            expected.append(("raise" if type(e) is jinja2.exceptions.TemplateError else "error", str(e)))
        except Exception as e:  # TypeError and friends: any error will do
            expected.append(("error", str(e)))

    payload = "".join(json.dumps({"template": tpl, "vars": v}, ensure_ascii=False) + "\n"
                      for _, tpl, v in cases)
    proc = subprocess.run([args.driver], input=payload.encode("utf-8"), capture_output=True,
                          timeout=120)
    if proc.returncode != 0:
        print(f"driver exited {proc.returncode}: {proc.stderr.decode(errors='replace')}")
        return 1
    got = [json.loads(line) for line in proc.stdout.decode("utf-8").split("\n") if line]
    if len(got) != len(cases):
        print(f"driver answered {len(got)} of {len(cases)} cases")
        return 1
    failures = 0
    by_kind = {}
    for (name, tpl, variables), (kind, want), g in zip(cases, expected, got):
        by_kind[kind] = by_kind.get(kind, 0) + 1
        ok = False
        if kind == "ok":
            ok = g["ok"] and g["text"] == want
        elif kind == "raise":
            ok = (not g["ok"]) and g["code"] == "FAILED_PRECONDITION" and g["error"] == want
        else:
            ok = not g["ok"]
        if not ok:
            failures += 1
            if failures <= 10:
                print(f"MISMATCH {name} ({kind})\n  template: {tpl[:200]!r}\n  vars: "
                      f"{json.dumps(variables, ensure_ascii=False)[:300]}\n  jinja2: {want!r}\n  kvr:    {g!r}")
    print(f"{len(cases)} cases ({', '.join(f'{k}: {v}' for k, v in sorted(by_kind.items()))}), "
          f"{failures} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
