// The Jinja subset's limits and errors (services/gateway/jinja.h): every
// bound is enforced with an error naming it and the template position; the
// chat globals. Rendering correctness is jinja_oracle_test's (vs jinja2).
#include "services/gateway/jinja.h"

#include <gtest/gtest.h>

#include <memory>
#include <string>

#include "services/gateway/chat_template.h"

namespace kvr::jinja {
namespace {

absl::StatusOr<std::string> Render(const std::string& src, const Limits& limits = {}) {
  absl::StatusOr<Template> t = Template::Parse(src, limits);
  if (!t.ok()) return t.status();
  auto globals = std::make_shared<Dict>();
  gateway::AddChatGlobals(globals.get());
  return t->Render(Value::MakeDict(globals));
}

void ExpectError(const absl::StatusOr<std::string>& r, const std::string& needle) {
  ASSERT_FALSE(r.ok()) << "rendered: " << *r;
  EXPECT_NE(std::string(r.status().message()).find(needle), std::string::npos)
      << r.status().message();
}

TEST(JinjaLimits, TemplateBytes) {
  Limits l;
  l.max_template_bytes = 100;
  ExpectError(Render(std::string(101, 'a'), l), "101 bytes exceeds max_template_bytes 100");
  EXPECT_EQ(*Render(std::string(100, 'a'), l), std::string(100, 'a'));
}

TEST(JinjaLimits, DepthOfExpressionsAndBlocks) {
  ExpectError(Render("{{ " + std::string(200, '(') + "1" + std::string(200, ')') + " }}"),
              "exceeds max_depth 64");
  ExpectError(Render("{{ " + std::string(200, '[') + std::string(200, ']') + " }}"), "max_depth 64");
  std::string nested;
  for (int i = 0; i < 100; ++i) nested += "{% if true %}";
  for (int i = 0; i < 100; ++i) nested += "{% endif %}";
  ExpectError(Render(nested), "max_depth 64");
  ExpectError(Render("{{ " + std::string(500, '-') + "1 }}"), "max_depth 64");
  ExpectError(Render("{{ " + [] {
                std::string s;
                for (int i = 0; i < 300; ++i) s += "not ";
                return s;
              }() + "x }}"),
              "max_depth 64");
  // Within the bound: fine.
  EXPECT_EQ(*Render("{{ ((((1)))) }}"), "1");
}

TEST(JinjaLimits, LoopIterations) {
  Limits l;
  l.max_loop_iterations = 1000;
  ExpectError(Render("{% for i in range(2000) %}{% endfor %}", l), "max_loop_iterations 1000");
  ExpectError(Render("{% for i in range(40) %}{% for j in range(40) %}{% endfor %}{% endfor %}", l),
              "loop iterations exceed max_loop_iterations 1000");
  ExpectError(Render("{{ [1] * 5000 }}", l), "max_loop_iterations 1000");
  EXPECT_TRUE(Render("{% for i in range(30) %}{% for j in range(30) %}{% endfor %}{% endfor %}", l).ok());
}

TEST(JinjaLimits, OutputAndStringBytes) {
  Limits l;
  l.max_output_bytes = 1000;
  ExpectError(Render("{% for i in range(100) %}0123456789x{% endfor %}", l),
              "output exceeds max_output_bytes 1000");
  // Doubling a string never gets far: every intermediate value is bounded.
  ExpectError(Render("{% set ns = namespace(s='ab') %}{% for i in range(64) %}"
                     "{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
                     l),
              "exceeds max_output_bytes 1000");
  ExpectError(Render("{% set ns = namespace(s='ab') %}{% for i in range(64) %}"
                     "{% set ns.s = ns.s + ns.s %}{% endfor %}",
                     l),
              "exceeds max_output_bytes 1000");
  ExpectError(Render("{{ 'x' * 100000000000 }}", l), "max_output_bytes 1000");
  ExpectError(Render("{{ 'abc'|replace('', 'abcdefghij' * 30) }}", l), "max_output_bytes 1000");
}

TEST(JinjaLimits, MacroRecursion) {
  ExpectError(Render("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"),
              "nested deeper than max_call_depth 16");
}

TEST(JinjaErrors, NamePosition) {
  ExpectError(Render("line one\n{{ x.y }}"), "template:2:5: undefined value has no attribute 'y'");
  ExpectError(Render("ok\n\n  {% for %}"), "template:3:10:");
  ExpectError(Render("{{ 'a' + 1 }}"), "template:1:8: unsupported operand type(s) for +: 'str' and 'int'");
  ExpectError(Render("{% if x %}"), "expected 'endif'");
  ExpectError(Render("{{ x|nosuchfilter }}"), "template:1:6: no filter named 'nosuchfilter'");
  ExpectError(Render("{{ 1 // 0 }}"), "division or modulo by zero");
  ExpectError(Render("{{ 9223372036854775807 + 1 }}"), "integer overflow");
  ExpectError(Render("{{ 'unterminated }}"), "unterminated string literal");
  ExpectError(Render("{# open comment"), "missing end of comment tag");
  // Mixed keys are refused before sorting (a comparator that fails midway
  // would not be a strict weak order).
  ExpectError(Render("{{ [3, 'a', 1, 'b', 2]|sort }}"), "sort: items must be all numbers or all strings");
  EXPECT_EQ(*Render("{{ [3, 1.5, 2]|sort|join(',') }}"), "1.5,2,3");
}

TEST(JinjaErrors, RaiseExceptionIsFailedPreconditionWithTheMessage) {
  absl::StatusOr<std::string> r = Render("a{{ raise_exception('Conversation roles must alternate') }}");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(r.status().message(), "Conversation roles must alternate");
}

TEST(JinjaGlobals, StrftimeNowFormatsToday) {
  absl::StatusOr<std::string> r = Render("{{ strftime_now('%Y') }}");
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->size(), 4u);
  EXPECT_GE(std::stoi(*r), 2024);
  ExpectError(Render("{{ strftime_now(1) }}"), "strftime_now: expected a format string");
}

TEST(ChatTemplate, RendersMessagesAndSpecialTokens) {
  absl::StatusOr<gateway::ChatTemplate> t = gateway::ChatTemplate::Create(
      "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{{ eos_token }}{% endfor %}"
      "{% if add_generation_prompt %}[assistant]{% endif %}{{ tools is none }}",
      "<s>", "</s>");
  ASSERT_TRUE(t.ok()) << t.status();
  nlohmann::json msgs = nlohmann::json::parse(R"([{"role": "user", "content": "hi"}])");
  EXPECT_EQ(*t->Render(msgs, true), "<s>[user]hi</s>[assistant]True");
  EXPECT_EQ(*t->Render(msgs, false), "<s>[user]hi</s>True");
  absl::StatusOr<gateway::ChatTemplate> bad = gateway::ChatTemplate::Create("{% if %}", "", "");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(std::string(bad.status().message()).find("chat_template: template:1:7:"), std::string::npos)
      << bad.status().message();
}

}  // namespace
}  // namespace kvr::jinja
