// A bounded subset of Jinja2, enough to render Hugging Face chat templates
// (tokenizer_config.json `chat_template`) exactly as transformers'
// apply_chat_template does: jinja2 with trim_blocks=True,
// lstrip_blocks=True, keep_trailing_newline=False, the loopcontrols
// extension, `tojson` as json.dumps(ensure_ascii=False), and the globals
// raise_exception(msg) and strftime_now(fmt) (added by the caller).
//
// Supported: {{ }}, {% if/elif/else %}, {% for x[, y] in xs [if cond] %}
// (loop.index0/index/revindex/revindex0/first/last/length/previtem/
// nextitem, {% else %}, break/continue), {% set %} (names, tuples,
// namespace attributes, block set), {% macro %} (called like a function),
// {% generation %} (transparent), comments and whitespace control (`-`,
// `+`); literals (string, int, float, bool, none, list, tuple, dict);
// attribute / subscript / slice access; + - * / // % ** ~, comparisons
// (chained), and/or/not, in / not in, `a if b else c`; tests (defined,
// undefined, none, string, number, integer, float, boolean, true, false,
// mapping, iterable, sequence, callable, odd, even, divisibleby, equalto /
// eq / ==, ne, lt, gt, le, ge, in, sameas, lower, upper); filters (trim,
// length/count, upper, lower, title, capitalize, tojson(indent=), default/d,
// items, list, first, last, reverse, join, replace, string, int, float, abs,
// unique, sort, select, reject, selectattr, rejectattr, map, safe; no
// autoescape, as chat templates run); string methods strip/lstrip/rstrip,
// startswith/endswith, split, upper/lower/title/capitalize, replace, find,
// count; dict get/items/keys/values; globals range, namespace, dict.
// Strings index, slice and count by code point (Python's str); strip and
// trim use Python's Unicode whitespace; upper/lower/title are ASCII-only.
// Unknown filters / tests / methods are errors when evaluated (not when
// parsed, so an unused branch may name one).
//
// Hostile templates: every resource is bounded by `Limits` (template bytes,
// AST depth, loop iterations, output bytes and every intermediate string or
// list, macro recursion), and every error names the template line:column
// ("template:3:14: ..."). Nothing here throws or aborts on any input.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include "absl/strings/string_view.h"
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace kvr::jinja {

// Resource bounds of parsing and rendering one template.
struct Limits {
  size_t max_template_bytes = 64 * 1024;  // source size
  int max_depth = 64;                     // nesting of expressions and blocks
  int64_t max_loop_iterations = 100000;   // summed over every loop of a render
  size_t max_output_bytes = 1 << 20;      // rendered text, and any one string value
  int max_call_depth = 16;                // macro recursion
};

class Value;
struct Dict;
struct CallArgs;
using List = std::vector<Value>;
// A builtin function or bound method: gets its evaluated arguments.
using Function = std::function<absl::StatusOr<Value>(CallArgs&)>;

// A Jinja value (Python semantics): undefined, None, bool, int, float,
// string, list (or tuple), dict (insertion-ordered, string keys), namespace
// (a dict whose attributes `set` may assign), callable. Lists and dicts
// are shared and immutable once built (templates cannot mutate them).
class Value {
 public:
  enum class Kind : uint8_t {
    kUndefined, kNone, kBool, kInt, kFloat, kString, kList, kDict, kNamespace, kCallable
  };
  Value() = default;  // undefined
  static Value None();
  static Value Bool(bool b);
  static Value Int(int64_t i);
  static Value Float(double d);
  static Value String(std::string s);
  static Value MakeList(List items, bool tuple = false);
  static Value MakeDict(std::shared_ptr<Dict> d);
  static Value MakeNamespace(std::shared_ptr<Dict> d);
  static Value MakeCallable(Function f, std::string name);

  Kind kind() const { return kind_; }
  bool is_undefined() const { return kind_ == Kind::kUndefined; }
  bool is_none() const { return kind_ == Kind::kNone; }
  bool is_string() const { return kind_ == Kind::kString; }
  bool is_list() const { return kind_ == Kind::kList; }
  bool is_mapping() const { return kind_ == Kind::kDict || kind_ == Kind::kNamespace; }
  bool is_number() const { return kind_ == Kind::kInt || kind_ == Kind::kFloat || kind_ == Kind::kBool; }
  bool is_tuple() const { return tuple_; }
  bool bool_value() const { return b_; }
  int64_t int_value() const { return i_; }
  double float_value() const { return d_; }
  const std::string& str() const { return s_; }
  const List& list() const { return *list_; }
  const Dict& dict() const { return *dict_; }
  Dict& mutable_dict() const { return *dict_; }
  const Function& fn() const { return *fn_; }

  // Python truthiness.
  bool Truthy() const;
  // str(value) as Jinja prints it ("None", "True", "1.0", "['a', 1]").
  std::string ToString() const;
  // repr(value) (strings quoted), used inside containers.
  std::string Repr() const;

 private:
  Kind kind_ = Kind::kUndefined;
  bool tuple_ = false;
  bool b_ = false;
  int64_t i_ = 0;
  double d_ = 0.0;
  std::string s_;
  std::shared_ptr<const List> list_;
  std::shared_ptr<Dict> dict_;
  std::shared_ptr<const Function> fn_;
};

// An insertion-ordered string-keyed map.
struct Dict {
  std::vector<std::pair<std::string, Value>> items;
  const Value* Find(absl::string_view key) const;
  void Set(const std::string& key, Value v);
  // Adds without looking for `key` (O(1)): for keys known to be new, e.g.
  // a parsed JSON object's.
  void Append(std::string key, Value v) { items.emplace_back(std::move(key), std::move(v)); }
};

// Arguments of a call: positional, then keyword (name, value) in order.
struct CallArgs {
  std::vector<Value> args;
  std::vector<std::pair<std::string, Value>> kwargs;
  // The argument at `pos` or named `name`, or undefined.
  const Value& Get(size_t pos, absl::string_view name) const;
};

// Python equality (1 == 1.0 == True, lists and dicts element-wise).
bool Equal(const Value& a, const Value& b);

// json.dumps(v, ensure_ascii=False, indent=indent (< 0: none)). Undefined
// and callables are errors; int/float/bool/None/str/list/dict as Python.
absl::StatusOr<std::string> ToJson(const Value& v, int indent = -1);

struct Node;  // the parsed template (opaque)

// A parsed template. Parse once, render many times (Render is const and
// thread-safe; each call has its own state).
class Template {
 public:
  // InvalidArgument "template:LINE:COL: <what>" for a syntax error, or
  // naming the limit (max_template_bytes, max_depth) exceeded.
  static absl::StatusOr<Template> Parse(absl::string_view source, const Limits& limits = {});

  // Renders with `variables` (a dict value; its entries are the template's
  // globals). Errors: InvalidArgument "template:LINE:COL: ..." for type
  // errors, undefined attribute access, unknown filters; the limits named
  // ("... exceeds max_output_bytes 1048576"); a raise_exception(msg) call
  // is FailedPrecondition with exactly `msg` as its message.
  absl::StatusOr<std::string> Render(const Value& variables) const;

  Template(Template&&) noexcept;
  Template& operator=(Template&&) noexcept;
  ~Template();

 private:
  Template();
  std::unique_ptr<Node> root_;
  Limits limits_;
};

// The error a raise_exception global returns: FailedPrecondition(message).
absl::Status RaiseException(absl::string_view message);

}  // namespace kvr::jinja
