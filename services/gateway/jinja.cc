#include "services/gateway/jinja.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <limits>
#include <map>
#include <optional>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status.h"

namespace kvr::jinja {

// ---------------------------------------------------------------- values

Value Value::None() {
  Value v;
  v.kind_ = Kind::kNone;
  return v;
}
Value Value::Bool(bool b) {
  Value v;
  v.kind_ = Kind::kBool;
  v.b_ = b;
  v.i_ = b ? 1 : 0;
  v.d_ = v.i_;
  return v;
}
Value Value::Int(int64_t i) {
  Value v;
  v.kind_ = Kind::kInt;
  v.i_ = i;
  v.d_ = static_cast<double>(i);
  return v;
}
Value Value::Float(double d) {
  Value v;
  v.kind_ = Kind::kFloat;
  v.d_ = d;
  return v;
}
Value Value::String(std::string s) {
  Value v;
  v.kind_ = Kind::kString;
  v.s_ = std::move(s);
  return v;
}
Value Value::MakeList(List items, bool tuple) {
  Value v;
  v.kind_ = Kind::kList;
  v.tuple_ = tuple;
  v.list_ = std::make_shared<const List>(std::move(items));
  return v;
}
Value Value::MakeDict(std::shared_ptr<Dict> d) {
  Value v;
  v.kind_ = Kind::kDict;
  v.dict_ = std::move(d);
  return v;
}
Value Value::MakeNamespace(std::shared_ptr<Dict> d) {
  Value v;
  v.kind_ = Kind::kNamespace;
  v.dict_ = std::move(d);
  return v;
}
Value Value::MakeCallable(Function f, std::string name) {
  Value v;
  v.kind_ = Kind::kCallable;
  v.s_ = std::move(name);
  v.fn_ = std::make_shared<const Function>(std::move(f));
  return v;
}

bool Value::Truthy() const {
  switch (kind_) {
    case Kind::kUndefined:
    case Kind::kNone:
      return false;
    case Kind::kBool:
      return b_;
    case Kind::kInt:
      return i_ != 0;
    case Kind::kFloat:
      return d_ != 0.0;
    case Kind::kString:
      return !s_.empty();
    case Kind::kList:
      return !list_->empty();
    case Kind::kDict:
      return !dict_->items.empty();
    case Kind::kNamespace:
    case Kind::kCallable:
      return true;
  }
  return false;
}

namespace {

// Python's repr(float): shortest round-trip digits, scientific when the
// exponent is < -4 or >= 16, else fixed with at least one decimal.
std::string FloatRepr(double d) {
  if (std::isnan(d)) return "nan";
  if (std::isinf(d)) return d > 0 ? "inf" : "-inf";
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof(buf), d, std::chars_format::scientific);
  std::string sci(buf, res.ptr);
  // sci: [-]D[.DDD]e[+-]XX
  const size_t e = sci.find('e');
  const int exp = std::atoi(sci.c_str() + e + 1);
  std::string mant = sci.substr(0, e);
  const bool neg = !mant.empty() && mant[0] == '-';
  if (neg) mant.erase(0, 1);
  std::string digits;
  for (char c : mant) {
    if (c != '.') digits += c;
  }
  std::string out;
  if (exp < -4 || exp >= 16) {
    out = digits.substr(0, 1);
    if (digits.size() > 1) out += "." + digits.substr(1);
    char eb[16];
    std::snprintf(eb, sizeof(eb), "e%c%02d", exp < 0 ? '-' : '+', exp < 0 ? -exp : exp);
    out += eb;
  } else if (exp < 0) {
    out = "0." + std::string(static_cast<size_t>(-exp - 1), '0') + digits;
  } else {
    const size_t int_len = static_cast<size_t>(exp) + 1;
    if (digits.size() <= int_len) {
      out = digits + std::string(int_len - digits.size(), '0') + ".0";
    } else {
      out = digits.substr(0, int_len) + "." + digits.substr(int_len);
    }
  }
  return neg ? "-" + out : out;
}

std::string StringRepr(const std::string& s) {
  // Python prefers single quotes unless the string has ' and no ".
  const bool use_double = s.find('\'') != std::string::npos && s.find('"') == std::string::npos;
  const char q = use_double ? '"' : '\'';
  std::string out(1, q);
  for (unsigned char c : s) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == q) {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c == '\t') {
      out += "\\t";
    } else if (c < 0x20 || c == 0x7f) {
      char b[8];
      std::snprintf(b, sizeof(b), "\\x%02x", c);
      out += b;
    } else {
      out += static_cast<char>(c);
    }
  }
  out += q;
  return out;
}

}  // namespace

std::string Value::ToString() const {
  switch (kind_) {
    case Kind::kUndefined:
      return "";
    case Kind::kNone:
      return "None";
    case Kind::kBool:
      return b_ ? "True" : "False";
    case Kind::kInt:
      return absl::StrCat(i_);
    case Kind::kFloat:
      return FloatRepr(d_);
    case Kind::kString:
      return s_;
    default:
      return Repr();
  }
}

std::string Value::Repr() const {
  switch (kind_) {
    case Kind::kString:
      return StringRepr(s_);
    case Kind::kList: {
      std::string out = tuple_ ? "(" : "[";
      for (size_t i = 0; i < list_->size(); ++i) {
        if (i > 0) out += ", ";
        out += (*list_)[i].Repr();
      }
      if (tuple_ && list_->size() == 1) out += ",";
      out += tuple_ ? ")" : "]";
      return out;
    }
    case Kind::kDict: {
      std::string out = "{";
      for (size_t i = 0; i < dict_->items.size(); ++i) {
        if (i > 0) out += ", ";
        out += StringRepr(dict_->items[i].first) + ": " + dict_->items[i].second.Repr();
      }
      return out + "}";
    }
    case Kind::kNamespace:
      return "<Namespace>";
    case Kind::kCallable:
      return "<function " + s_ + ">";
    default:
      return ToString();
  }
}

const Value* Dict::Find(absl::string_view key) const {
  for (const auto& [k, v] : items) {
    if (k == key) return &v;
  }
  return nullptr;
}

void Dict::Set(const std::string& key, Value v) {
  for (auto& [k, old] : items) {
    if (k == key) {
      old = std::move(v);
      return;
    }
  }
  items.emplace_back(key, std::move(v));
}

const Value& CallArgs::Get(size_t pos, absl::string_view name) const {
  static const Value kUndefined;
  if (pos < args.size()) return args[pos];
  for (const auto& [k, v] : kwargs) {
    if (k == name) return v;
  }
  return kUndefined;
}

bool Equal(const Value& a, const Value& b) {
  using K = Value::Kind;
  if (a.is_number() && b.is_number()) {
    if (a.kind() == K::kFloat || b.kind() == K::kFloat) return a.float_value() == b.float_value();
    return a.int_value() == b.int_value();
  }
  if (a.kind() != b.kind()) return false;
  switch (a.kind()) {
    case K::kUndefined:
    case K::kNone:
      return true;
    case K::kString:
      return a.str() == b.str();
    case K::kList: {
      if (&a.list() == &b.list()) return true;
      if (a.list().size() != b.list().size()) return false;
      for (size_t i = 0; i < a.list().size(); ++i) {
        if (!Equal(a.list()[i], b.list()[i])) return false;
      }
      return true;
    }
    case K::kDict: {
      if (&a.dict() == &b.dict()) return true;
      const auto& x = a.dict().items;
      const auto& y = b.dict().items;
      if (x.size() != y.size()) return false;
      for (size_t i = 0; i < x.size(); ++i) {
        // Same key order (the common case) is linear; otherwise look up.
        const Value* o = x[i].first == y[i].first ? &y[i].second : b.dict().Find(x[i].first);
        if (o == nullptr || !Equal(x[i].second, *o)) return false;
      }
      return true;
    }
    case K::kNamespace:
      return &a.dict() == &b.dict();
    default:
      return false;
  }
}

namespace {

void JsonString(const std::string& s, std::string* out) {
  *out += '"';
  for (unsigned char c : s) {
    switch (c) {
      case '"': *out += "\\\""; break;
      case '\\': *out += "\\\\"; break;
      case '\n': *out += "\\n"; break;
      case '\r': *out += "\\r"; break;
      case '\t': *out += "\\t"; break;
      case '\b': *out += "\\b"; break;
      case '\f': *out += "\\f"; break;
      default:
        if (c < 0x20) {
          char b[8];
          std::snprintf(b, sizeof(b), "\\u%04x", c);
          *out += b;
        } else {
          *out += static_cast<char>(c);
        }
    }
  }
  *out += '"';
}

absl::Status JsonInto(const Value& v, int indent, int level, std::string* out) {
  using K = Value::Kind;
  auto newline = [&](int lvl) {
    if (indent < 0) return;
    *out += '\n';
    out->append(static_cast<size_t>(indent) * static_cast<size_t>(lvl), ' ');
  };
  switch (v.kind()) {
    case K::kNone: *out += "null"; return absl::OkStatus();
    case K::kBool: *out += v.bool_value() ? "true" : "false"; return absl::OkStatus();
    case K::kInt: absl::StrAppend(out, v.int_value()); return absl::OkStatus();
    case K::kFloat: {
      const double d = v.float_value();
      *out += std::isnan(d) ? "NaN" : std::isinf(d) ? (d > 0 ? "Infinity" : "-Infinity") : FloatRepr(d);
      return absl::OkStatus();
    }
    case K::kString: JsonString(v.str(), out); return absl::OkStatus();
    case K::kList: {
      if (v.list().empty()) {
        *out += "[]";
        return absl::OkStatus();
      }
      *out += '[';
      for (size_t i = 0; i < v.list().size(); ++i) {
        if (i > 0) *out += indent < 0 ? ", " : ",";
        newline(level + 1);
        KVR_RETURN_IF_ERROR(JsonInto(v.list()[i], indent, level + 1, out));
      }
      newline(level);
      *out += ']';
      return absl::OkStatus();
    }
    case K::kDict:
    case K::kNamespace: {
      if (v.dict().items.empty()) {
        *out += "{}";
        return absl::OkStatus();
      }
      *out += '{';
      for (size_t i = 0; i < v.dict().items.size(); ++i) {
        if (i > 0) *out += indent < 0 ? ", " : ",";
        newline(level + 1);
        JsonString(v.dict().items[i].first, out);
        *out += ": ";
        KVR_RETURN_IF_ERROR(JsonInto(v.dict().items[i].second, indent, level + 1, out));
      }
      newline(level);
      *out += '}';
      return absl::OkStatus();
    }
    default:
      return absl::InvalidArgumentError("tojson: value is not JSON serializable");
  }
}

}  // namespace

absl::StatusOr<std::string> ToJson(const Value& v, int indent) {
  std::string out;
  KVR_RETURN_IF_ERROR(JsonInto(v, indent, 0, &out));
  return out;
}

absl::Status RaiseException(absl::string_view message) {
  return absl::FailedPreconditionError(message);
}

// ---------------------------------------------------------------- lexer

namespace {

struct Pos {
  int line = 1;
  int col = 1;
};

std::string At(Pos p) { return absl::StrCat("template:", p.line, ":", p.col, ": "); }

enum class Tok : uint8_t { kName, kString, kInt, kFloat, kOp, kEnd };

struct Token {
  Tok type = Tok::kEnd;
  std::string text;  // name, operator, decoded string
  int64_t i = 0;
  double d = 0.0;
  Pos pos;
};

// One piece of the template: literal text, an output tag or a statement tag.
struct Piece {
  enum Kind : uint8_t { kText, kOutput, kStatement } kind = kText;
  std::string text;
  std::vector<Token> tokens;  // ends with a kEnd token
  Pos pos;
};

bool IsSpace(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }
bool IsNameStart(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_'; }
bool IsDigit(char c) { return c >= '0' && c <= '9'; }

// The code point at *i (advancing *i); an invalid byte is taken as itself.
uint32_t DecodeUtf8(const std::string& s, size_t* i) {
  const unsigned char c = static_cast<unsigned char>(s[*i]);
  size_t len = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
  if (*i + len > s.size()) len = 1;
  uint32_t cp = len == 1 ? c : len == 2 ? (c & 0x1F) : len == 3 ? (c & 0x0F) : (c & 0x07);
  for (size_t k = 1; k < len; ++k) {
    const unsigned char d = static_cast<unsigned char>(s[*i + k]);
    if ((d & 0xC0) != 0x80) {
      len = 1;
      cp = c;
      break;
    }
    cp = (cp << 6) | (d & 0x3F);
  }
  *i += len;
  return cp;
}

// Byte offset of each code point of `s` (invalid bytes count as one each).
std::vector<size_t> CharOffsets(const std::string& s) {
  std::vector<size_t> at;
  at.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    at.push_back(i);
    DecodeUtf8(s, &i);
  }
  return at;
}

// Python's str.isspace() for one code point.
bool IsPySpace(uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || (cp >= 0x1C && cp <= 0x20) || cp == 0x85 || cp == 0xA0 ||
         cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 ||
         cp == 0x202F || cp == 0x205F || cp == 0x3000;
}

void AppendUtf8(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    *out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    *out += static_cast<char>(0xC0 | (cp >> 6));
    *out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    *out += static_cast<char>(0xE0 | (cp >> 12));
    *out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    *out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    *out += static_cast<char>(0xF0 | (cp >> 18));
    *out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    *out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    *out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

class Lexer {
 public:
  explicit Lexer(std::string src) : src_(std::move(src)) {}

  absl::StatusOr<std::vector<Piece>> Run() {
    std::vector<Piece> pieces;
    size_t pos = 0;
    bool line_starting = true;
    while (pos < src_.size()) {
      size_t start = pos;
      char kind = 0;
      while (true) {
        start = src_.find('{', start);
        if (start == std::string::npos || start + 1 >= src_.size()) {
          start = std::string::npos;
          break;
        }
        const char c = src_[start + 1];
        if (c == '{' || c == '%' || c == '#') {
          kind = c;
          break;
        }
        ++start;
      }
      if (start == std::string::npos) {
        AddText(&pieces, src_.substr(pos), pos);
        break;
      }
      std::string text = src_.substr(pos, start - pos);
      const char sign = start + 2 < src_.size() ? src_[start + 2] : 0;
      if (sign == '-') {
        size_t end = text.size();
        while (end > 0 && IsSpace(text[end - 1])) --end;
        text.resize(end);
      } else if (sign != '+' && kind != '{') {
        const size_t nl = text.rfind('\n');
        const size_t l_pos = nl == std::string::npos ? 0 : nl + 1;
        if ((l_pos > 0 || line_starting) && l_pos < text.size()) {
          bool all_space = true;
          for (size_t i = l_pos; i < text.size(); ++i) all_space = all_space && IsSpace(text[i]);
          if (all_space) text.resize(l_pos);
        }
      }
      AddText(&pieces, text, pos);
      const Pos tag_pos = PosOf(start);
      size_t p = start + 2 + ((sign == '-' || sign == '+') ? 1 : 0);
      if (kind == '#') {
        const size_t close = src_.find("#}", p);
        if (close == std::string::npos) return Error(tag_pos, "missing end of comment tag");
        pos = close + 2;
        if (close > p && src_[close - 1] == '-') {
          while (pos < src_.size() && IsSpace(src_[pos])) ++pos;
        } else if (!(close > p && src_[close - 1] == '+') && pos < src_.size() && src_[pos] == '\n') {
          ++pos;
        }
        line_starting = src_[pos - 1] == '\n';
        continue;
      }
      Piece piece;
      piece.kind = kind == '{' ? Piece::kOutput : Piece::kStatement;
      piece.pos = tag_pos;
      KVR_ASSIGN_OR_RETURN(pos, Tokens(p, kind == '{', &piece.tokens));
      line_starting = src_[pos - 1] == '\n';
      pieces.push_back(std::move(piece));
    }
    return pieces;
  }

 private:
  absl::Status Error(Pos p, absl::string_view msg) const {
    return absl::InvalidArgumentError(absl::StrCat(At(p), msg));
  }

  Pos PosOf(size_t offset) {
    // Incremental: offsets are asked for in increasing order.
    if (offset < scan_) {
      scan_ = 0;
      scan_pos_ = Pos{};
    }
    for (; scan_ < offset && scan_ < src_.size(); ++scan_) {
      if (src_[scan_] == '\n') {
        ++scan_pos_.line;
        scan_pos_.col = 1;
      } else {
        ++scan_pos_.col;
      }
    }
    return scan_pos_;
  }

  void AddText(std::vector<Piece>* pieces, std::string text, size_t offset) {
    if (text.empty()) return;
    Piece piece;
    piece.kind = Piece::kText;
    piece.pos = PosOf(offset);
    piece.text = std::move(text);
    pieces->push_back(std::move(piece));
  }

  // Tokenizes an expression from `p` up to its end tag (at bracket depth
  // 0); returns the offset after the tag and its trailing whitespace rule.
  absl::StatusOr<size_t> Tokens(size_t p, bool output, std::vector<Token>* out) {
    std::vector<char> balance;
    const char close = output ? '}' : '%';
    while (true) {
      if (p >= src_.size()) {
        return Error(PosOf(std::min(p, src_.size())),
                     output ? "unexpected end of template, expected '}}'"
                            : "unexpected end of template, expected '%}'");
      }
      if (balance.empty()) {
        // End tag: "-}}" / "}}" or "-%}" / "+%}" / "%}".
        size_t q = p;
        char sign = 0;
        if ((src_[q] == '-' || (!output && src_[q] == '+')) && q + 2 < src_.size() &&
            src_[q + 1] == close && src_[q + 2] == '}') {
          sign = src_[q];
          ++q;
        }
        if (q + 1 < src_.size() && src_[q] == close && src_[q + 1] == '}') {
          Token end;
          end.type = Tok::kEnd;
          end.pos = PosOf(p);
          out->push_back(end);
          q += 2;
          if (sign == '-') {
            while (q < src_.size() && IsSpace(src_[q])) ++q;
          } else if (!output && sign != '+' && q < src_.size() && src_[q] == '\n') {
            ++q;  // trim_blocks
          }
          return q;
        }
      }
      const char c = src_[p];
      if (IsSpace(c)) {
        ++p;
        continue;
      }
      Token t;
      t.pos = PosOf(p);
      if (IsNameStart(c)) {
        size_t q = p;
        while (q < src_.size() && (IsNameStart(src_[q]) || IsDigit(src_[q]))) ++q;
        t.type = Tok::kName;
        t.text = src_.substr(p, q - p);
        p = q;
      } else if (IsDigit(c)) {
        size_t q = p;
        while (q < src_.size() && (IsDigit(src_[q]) || src_[q] == '_')) ++q;
        bool is_float = false;
        if (q + 1 < src_.size() && src_[q] == '.' && IsDigit(src_[q + 1])) {
          is_float = true;
          ++q;
          while (q < src_.size() && (IsDigit(src_[q]) || src_[q] == '_')) ++q;
        }
        if (q < src_.size() && (src_[q] == 'e' || src_[q] == 'E')) {
          size_t r = q + 1;
          if (r < src_.size() && (src_[r] == '+' || src_[r] == '-')) ++r;
          if (r < src_.size() && IsDigit(src_[r])) {
            while (r < src_.size() && IsDigit(src_[r])) ++r;
            is_float = true;
            q = r;
          }
        }
        std::string num;
        for (size_t i = p; i < q; ++i) {
          if (src_[i] != '_') num += src_[i];
        }
        if (is_float) {
          t.type = Tok::kFloat;
          t.d = std::strtod(num.c_str(), nullptr);
        } else {
          t.type = Tok::kInt;
          auto [ptr, ec] = std::from_chars(num.data(), num.data() + num.size(), t.i);
          if (ec != std::errc() || ptr != num.data() + num.size()) {
            return Error(t.pos, "integer literal out of range");
          }
        }
        p = q;
      } else if (c == '\'' || c == '"') {
        t.type = Tok::kString;
        size_t q = p + 1;
        while (true) {
          if (q >= src_.size()) return Error(t.pos, "unterminated string literal");
          const char d = src_[q];
          if (d == c) break;
          if (d == '\\' && q + 1 < src_.size()) {
            const char e = src_[q + 1];
            q += 2;
            switch (e) {
              case 'n': t.text += '\n'; break;
              case 't': t.text += '\t'; break;
              case 'r': t.text += '\r'; break;
              case '\\': t.text += '\\'; break;
              case '\'': t.text += '\''; break;
              case '"': t.text += '"'; break;
              case 'a': t.text += '\a'; break;
              case 'b': t.text += '\b'; break;
              case 'f': t.text += '\f'; break;
              case 'v': t.text += '\v'; break;
              case '0': t.text += '\0'; break;
              case '\n': break;
              case 'x':
              case 'u':
              case 'U': {
                const size_t n = e == 'x' ? 2 : e == 'u' ? 4 : 8;
                if (q + n > src_.size()) return Error(t.pos, "truncated \\" + std::string(1, e) + " escape");
                uint32_t cp = 0;
                for (size_t i = 0; i < n; ++i) {
                  const char h = src_[q + i];
                  int hv = (h >= '0' && h <= '9') ? h - '0'
                           : (h >= 'a' && h <= 'f') ? h - 'a' + 10
                           : (h >= 'A' && h <= 'F') ? h - 'A' + 10
                                                    : -1;
                  if (hv < 0) return Error(t.pos, "invalid \\" + std::string(1, e) + " escape");
                  cp = cp * 16 + static_cast<uint32_t>(hv);
                }
                if (cp > 0x10FFFF) return Error(t.pos, "escape outside Unicode");
                q += n;
                AppendUtf8(cp, &t.text);
                break;
              }
              default:
                t.text += '\\';
                t.text += e;
            }
            continue;
          }
          t.text += d;
          ++q;
        }
        p = q + 1;
      } else {
        static const char* const kOps2[] = {"//", "**", "==", "!=", "<=", ">="};
        t.type = Tok::kOp;
        for (const char* op : kOps2) {
          if (src_.compare(p, 2, op) == 0) t.text = op;
        }
        if (t.text.empty()) {
          if (absl::string_view("+-/*%~[](){}<>=.:|,;").find(c) == absl::string_view::npos) {
            return Error(t.pos, absl::StrCat("unexpected char '", std::string(1, c), "'"));
          }
          t.text = std::string(1, c);
        }
        p += t.text.size();
        if (c == '(' || c == '[' || c == '{') {
          balance.push_back(c == '(' ? ')' : c == '[' ? ']' : '}');
        } else if (c == ')' || c == ']' || c == '}') {
          if (balance.empty() || balance.back() != c) {
            return Error(t.pos, absl::StrCat("unexpected '", std::string(1, c), "'"));
          }
          balance.pop_back();
        }
      }
      out->push_back(std::move(t));
    }
  }

  std::string src_;
  size_t scan_ = 0;
  Pos scan_pos_;
};

}  // namespace

// ---------------------------------------------------------------- AST

struct Node {
  enum class K : uint8_t {
    // expressions
    kLiteral, kName, kList, kTuple, kDict, kAttr, kSubscript, kSlice, kCall, kFilter, kTest,
    kNeg, kPos, kNot, kBinary, kAnd, kOr, kCompare, kCond,
    // statements
    kBody, kText, kOutput, kIf, kFor, kSet, kSetBlock, kMacro, kBreak, kContinue
  };
  K kind = K::kLiteral;
  Pos pos;
  Value value;                 // literal; text
  std::string name;            // name, attr, op, filter/test name, set target
  std::string attr;            // namespace attribute of a set
  std::vector<std::string> names;      // call keyword names ("" positional); for/set targets; macro params
  std::vector<std::unique_ptr<Node>> kids;
  bool negated = false;        // `is not`
};

using NodePtr = std::unique_ptr<Node>;

namespace {

// ---------------------------------------------------------------- parser

class Parser {
 public:
  Parser(std::vector<Piece> pieces, const Limits& limits)
      : pieces_(std::move(pieces)), limits_(limits) {}

  absl::StatusOr<NodePtr> ParseTemplate() {
    std::string end;
    KVR_ASSIGN_OR_RETURN(NodePtr body, ParseBody({}, &end));
    if (piece_ < pieces_.size()) return Error(pieces_[piece_].pos, "unexpected tag");
    return body;
  }

 private:
  absl::Status Error(Pos p, absl::string_view msg) const {
    return absl::InvalidArgumentError(absl::StrCat(At(p), msg));
  }

  absl::Status Enter(Pos p) {
    if (++depth_ > limits_.max_depth) {
      return Error(p, absl::StrCat("nesting exceeds max_depth ", limits_.max_depth));
    }
    return absl::OkStatus();
  }

  // Parses statements until a statement tag whose keyword is in `ends`
  // (its keyword stored in *end, the tag's tokens left at tok_ after the
  // keyword) or the end of the template (ends must be empty then).
  absl::StatusOr<NodePtr> ParseBody(const std::vector<std::string>& ends, std::string* end) {
    auto body = std::make_unique<Node>();
    body->kind = Node::K::kBody;
    if (piece_ < pieces_.size()) body->pos = pieces_[piece_].pos;
    KVR_RETURN_IF_ERROR(Enter(body->pos));
    while (piece_ < pieces_.size()) {
      Piece& pc = pieces_[piece_];
      if (pc.kind == Piece::kText) {
        auto n = std::make_unique<Node>();
        n->kind = Node::K::kText;
        n->pos = pc.pos;
        n->value = Value::String(std::move(pc.text));
        body->kids.push_back(std::move(n));
        ++piece_;
        continue;
      }
      toks_ = &pc.tokens;
      tok_ = 0;
      if (pc.kind == Piece::kOutput) {
        ++piece_;
        auto n = std::make_unique<Node>();
        n->kind = Node::K::kOutput;
        n->pos = pc.pos;
        KVR_ASSIGN_OR_RETURN(NodePtr e, ParseExpr());
        n->kids.push_back(std::move(e));
        KVR_RETURN_IF_ERROR(ExpectEnd());
        body->kids.push_back(std::move(n));
        continue;
      }
      const Token& kw = Cur();
      if (kw.type != Tok::kName) return Error(kw.pos, "expected a statement keyword");
      if (std::find(ends.begin(), ends.end(), kw.text) != ends.end()) {
        *end = kw.text;
        ++tok_;
        ++piece_;
        --depth_;
        return body;
      }
      ++piece_;
      ++tok_;
      KVR_ASSIGN_OR_RETURN(NodePtr st, ParseStatement(kw));
      if (st != nullptr) body->kids.push_back(std::move(st));
    }
    if (!ends.empty()) {
      return Error(pieces_.empty() ? Pos{} : pieces_.back().pos,
                   absl::StrCat("unexpected end of template, expected '", ends.back(), "'"));
    }
    --depth_;
    return body;
  }

  absl::StatusOr<NodePtr> ParseStatement(const Token& kw) {
    const std::string k = kw.text;
    auto n = std::make_unique<Node>();
    n->pos = kw.pos;
    if (k == "if") {
      n->kind = Node::K::kIf;
      while (true) {
        KVR_ASSIGN_OR_RETURN(NodePtr cond, ParseExpr());
        KVR_RETURN_IF_ERROR(ExpectEnd());
        std::string end;
        KVR_ASSIGN_OR_RETURN(NodePtr body, ParseBody({"elif", "else", "endif"}, &end));
        n->kids.push_back(std::move(cond));
        n->kids.push_back(std::move(body));
        if (end == "elif") continue;
        if (end == "else") {
          KVR_RETURN_IF_ERROR(ExpectEnd());
          KVR_ASSIGN_OR_RETURN(NodePtr els, ParseBody({"endif"}, &end));
          n->kids.push_back(std::move(els));
        }
        KVR_RETURN_IF_ERROR(ExpectEnd());
        return n;
      }
    }
    if (k == "for") {
      n->kind = Node::K::kFor;
      KVR_RETURN_IF_ERROR(ParseTargets(&n->names));
      if (!IsName("in")) return Error(Cur().pos, "expected 'in'");
      ++tok_;
      KVR_ASSIGN_OR_RETURN(NodePtr iter, ParseOr(/*no_cond=*/true));
      n->kids.push_back(std::move(iter));
      if (IsName("if")) {
        ++tok_;
        KVR_ASSIGN_OR_RETURN(NodePtr cond, ParseExpr());
        n->kids.push_back(std::move(cond));
      } else {
        n->kids.push_back(nullptr);
      }
      if (IsName("recursive")) return Error(Cur().pos, "recursive loops are not supported");
      KVR_RETURN_IF_ERROR(ExpectEnd());
      std::string end;
      ++loops_;
      KVR_ASSIGN_OR_RETURN(NodePtr body, ParseBody({"else", "endfor"}, &end));
      --loops_;
      n->kids.push_back(std::move(body));
      if (end == "else") {
        KVR_RETURN_IF_ERROR(ExpectEnd());
        KVR_ASSIGN_OR_RETURN(NodePtr els, ParseBody({"endfor"}, &end));
        n->kids.push_back(std::move(els));
      }
      KVR_RETURN_IF_ERROR(ExpectEnd());
      return n;
    }
    if (k == "set") {
      const Token& t = Cur();
      if (t.type != Tok::kName) return Error(t.pos, "expected a name after 'set'");
      if (Peek(1).type == Tok::kOp && Peek(1).text == ".") {
        n->name = t.text;
        if (Peek(2).type != Tok::kName) return Error(Peek(2).pos, "expected an attribute name");
        n->attr = Peek(2).text;
        tok_ += 3;
        n->names.push_back(n->name);
      } else {
        KVR_RETURN_IF_ERROR(ParseTargets(&n->names));
      }
      if (IsOp("=")) {
        ++tok_;
        n->kind = Node::K::kSet;
        KVR_ASSIGN_OR_RETURN(NodePtr e, ParseTupleOrExpr());
        n->kids.push_back(std::move(e));
        KVR_RETURN_IF_ERROR(ExpectEnd());
        return n;
      }
      if (!n->attr.empty() || n->names.size() != 1) return Error(Cur().pos, "expected '='");
      KVR_RETURN_IF_ERROR(ExpectEnd());
      n->kind = Node::K::kSetBlock;
      std::string end;
      KVR_ASSIGN_OR_RETURN(NodePtr body, ParseBody({"endset"}, &end));
      KVR_RETURN_IF_ERROR(ExpectEnd());
      n->kids.push_back(std::move(body));
      return n;
    }
    if (k == "macro") {
      n->kind = Node::K::kMacro;
      if (Cur().type != Tok::kName) return Error(Cur().pos, "expected a macro name");
      n->name = Cur().text;
      ++tok_;
      if (!IsOp("(")) return Error(Cur().pos, "expected '('");
      ++tok_;
      // kids[0] = body; kids[1..] = defaults (nullptr where none).
      std::vector<NodePtr> defaults;
      while (!IsOp(")")) {
        if (Cur().type != Tok::kName) return Error(Cur().pos, "expected a parameter name");
        n->names.push_back(Cur().text);
        ++tok_;
        if (IsOp("=")) {
          ++tok_;
          KVR_ASSIGN_OR_RETURN(NodePtr d, ParseExpr());
          defaults.push_back(std::move(d));
        } else {
          defaults.push_back(nullptr);
        }
        if (IsOp(",")) {
          ++tok_;
        } else if (!IsOp(")")) {
          return Error(Cur().pos, "expected ',' or ')'");
        }
      }
      ++tok_;
      KVR_RETURN_IF_ERROR(ExpectEnd());
      std::string end;
      const int loops = loops_;
      loops_ = 0;
      KVR_ASSIGN_OR_RETURN(NodePtr body, ParseBody({"endmacro"}, &end));
      loops_ = loops;
      KVR_RETURN_IF_ERROR(ExpectEnd());
      n->kids.push_back(std::move(body));
      for (auto& d : defaults) n->kids.push_back(std::move(d));
      return n;
    }
    if (k == "break" || k == "continue") {
      if (loops_ == 0) return Error(kw.pos, absl::StrCat("'", k, "' outside a loop"));
      n->kind = k == "break" ? Node::K::kBreak : Node::K::kContinue;
      KVR_RETURN_IF_ERROR(ExpectEnd());
      return n;
    }
    if (k == "generation") {
      KVR_RETURN_IF_ERROR(ExpectEnd());
      std::string end;
      KVR_ASSIGN_OR_RETURN(NodePtr body, ParseBody({"endgeneration"}, &end));
      KVR_RETURN_IF_ERROR(ExpectEnd());
      return body;
    }
    return Error(kw.pos, absl::StrCat("unknown or unsupported tag '", k, "'"));
  }

  absl::Status ParseTargets(std::vector<std::string>* names) {
    bool paren = false;
    if (IsOp("(")) {
      paren = true;
      ++tok_;
    }
    while (true) {
      if (Cur().type != Tok::kName) return Error(Cur().pos, "expected a name");
      names->push_back(Cur().text);
      ++tok_;
      if (!IsOp(",")) break;
      ++tok_;
    }
    if (paren) {
      if (!IsOp(")")) return Error(Cur().pos, "expected ')'");
      ++tok_;
    }
    return absl::OkStatus();
  }

  const Token& Cur() const { return (*toks_)[std::min(tok_, toks_->size() - 1)]; }
  const Token& Peek(size_t k) const { return (*toks_)[std::min(tok_ + k, toks_->size() - 1)]; }
  bool IsOp(absl::string_view op) const { return Cur().type == Tok::kOp && Cur().text == op; }
  bool IsName(absl::string_view n) const { return Cur().type == Tok::kName && Cur().text == n; }
  absl::Status ExpectEnd() {
    if (Cur().type != Tok::kEnd) {
      return Error(Cur().pos, absl::StrCat("unexpected '", Cur().text, "', expected end of tag"));
    }
    return absl::OkStatus();
  }
  absl::Status Expect(absl::string_view op) {
    if (!IsOp(op)) return Error(Cur().pos, absl::StrCat("expected '", op, "'"));
    ++tok_;
    return absl::OkStatus();
  }

  NodePtr Make(Node::K kind, Pos p) {
    auto n = std::make_unique<Node>();
    n->kind = kind;
    n->pos = p;
    return n;
  }

  // `a, b` in a set is a tuple.
  absl::StatusOr<NodePtr> ParseTupleOrExpr() {
    const Pos p = Cur().pos;
    KVR_ASSIGN_OR_RETURN(NodePtr first, ParseExpr());
    if (!IsOp(",")) return first;
    NodePtr t = Make(Node::K::kTuple, p);
    t->kids.push_back(std::move(first));
    while (IsOp(",")) {
      ++tok_;
      if (Cur().type == Tok::kEnd) break;
      KVR_ASSIGN_OR_RETURN(NodePtr e, ParseExpr());
      t->kids.push_back(std::move(e));
    }
    return t;
  }

  absl::StatusOr<NodePtr> ParseExpr() {
    const Pos p = Cur().pos;
    KVR_RETURN_IF_ERROR(Enter(p));
    KVR_ASSIGN_OR_RETURN(NodePtr e, ParseOr(false));
    while (IsName("if")) {
      ++tok_;
      NodePtr c = Make(Node::K::kCond, p);
      KVR_ASSIGN_OR_RETURN(NodePtr test, ParseOr(false));
      c->kids.push_back(std::move(e));
      c->kids.push_back(std::move(test));
      if (IsName("else")) {
        ++tok_;
        KVR_ASSIGN_OR_RETURN(NodePtr els, ParseExpr());
        c->kids.push_back(std::move(els));
      }
      e = std::move(c);
    }
    --depth_;
    return e;
  }

  absl::StatusOr<NodePtr> ParseOr(bool /*no_cond*/) {
    KVR_ASSIGN_OR_RETURN(NodePtr l, ParseAnd());
    while (IsName("or")) {
      const Pos p = Cur().pos;
      ++tok_;
      KVR_ASSIGN_OR_RETURN(NodePtr r, ParseAnd());
      NodePtr n = Make(Node::K::kOr, p);
      n->kids.push_back(std::move(l));
      n->kids.push_back(std::move(r));
      l = std::move(n);
    }
    return l;
  }

  absl::StatusOr<NodePtr> ParseAnd() {
    KVR_ASSIGN_OR_RETURN(NodePtr l, ParseNot());
    while (IsName("and")) {
      const Pos p = Cur().pos;
      ++tok_;
      KVR_ASSIGN_OR_RETURN(NodePtr r, ParseNot());
      NodePtr n = Make(Node::K::kAnd, p);
      n->kids.push_back(std::move(l));
      n->kids.push_back(std::move(r));
      l = std::move(n);
    }
    return l;
  }

  absl::StatusOr<NodePtr> ParseNot() {
    if (IsName("not")) {
      const Pos p = Cur().pos;
      ++tok_;
      KVR_RETURN_IF_ERROR(Enter(p));
      KVR_ASSIGN_OR_RETURN(NodePtr e, ParseNot());
      --depth_;
      NodePtr n = Make(Node::K::kNot, p);
      n->kids.push_back(std::move(e));
      return n;
    }
    return ParseCompare();
  }

  absl::StatusOr<NodePtr> ParseCompare() {
    const Pos p = Cur().pos;
    KVR_ASSIGN_OR_RETURN(NodePtr first, ParseMath1());
    NodePtr cmp;
    while (true) {
      std::string op;
      if (Cur().type == Tok::kOp &&
          (Cur().text == "==" || Cur().text == "!=" || Cur().text == "<" || Cur().text == "<=" ||
           Cur().text == ">" || Cur().text == ">=")) {
        op = Cur().text;
        ++tok_;
      } else if (IsName("in")) {
        op = "in";
        ++tok_;
      } else if (IsName("not") && Peek(1).type == Tok::kName && Peek(1).text == "in") {
        op = "notin";
        tok_ += 2;
      } else {
        break;
      }
      if (cmp == nullptr) {
        cmp = Make(Node::K::kCompare, p);
        cmp->kids.push_back(std::move(first));
      }
      KVR_ASSIGN_OR_RETURN(NodePtr r, ParseMath1());
      cmp->names.push_back(op);
      cmp->kids.push_back(std::move(r));
    }
    return cmp != nullptr ? std::move(cmp) : std::move(first);
  }

  NodePtr Bin(std::string op, NodePtr l, NodePtr r, Pos p) {
    NodePtr n = Make(Node::K::kBinary, p);
    n->name = std::move(op);
    n->kids.push_back(std::move(l));
    n->kids.push_back(std::move(r));
    return n;
  }

  absl::StatusOr<NodePtr> ParseMath1() {
    KVR_ASSIGN_OR_RETURN(NodePtr l, ParseConcat());
    while (IsOp("+") || IsOp("-")) {
      const Token op = Cur();
      ++tok_;
      KVR_ASSIGN_OR_RETURN(NodePtr r, ParseConcat());
      l = Bin(op.text, std::move(l), std::move(r), op.pos);
    }
    return l;
  }

  absl::StatusOr<NodePtr> ParseConcat() {
    KVR_ASSIGN_OR_RETURN(NodePtr l, ParseMath2());
    while (IsOp("~")) {
      const Token op = Cur();
      ++tok_;
      KVR_ASSIGN_OR_RETURN(NodePtr r, ParseMath2());
      l = Bin("~", std::move(l), std::move(r), op.pos);
    }
    return l;
  }

  absl::StatusOr<NodePtr> ParseMath2() {
    KVR_ASSIGN_OR_RETURN(NodePtr l, ParsePow());
    while (IsOp("*") || IsOp("/") || IsOp("//") || IsOp("%")) {
      const Token op = Cur();
      ++tok_;
      KVR_ASSIGN_OR_RETURN(NodePtr r, ParsePow());
      l = Bin(op.text, std::move(l), std::move(r), op.pos);
    }
    return l;
  }

  absl::StatusOr<NodePtr> ParsePow() {
    KVR_ASSIGN_OR_RETURN(NodePtr l, ParseUnary(true));
    while (IsOp("**")) {
      const Token op = Cur();
      ++tok_;
      KVR_ASSIGN_OR_RETURN(NodePtr r, ParseUnary(true));
      l = Bin("**", std::move(l), std::move(r), op.pos);
    }
    return l;
  }

  absl::StatusOr<NodePtr> ParseUnary(bool with_filter) {
    const Pos p = Cur().pos;
    KVR_RETURN_IF_ERROR(Enter(p));
    NodePtr n;
    if (IsOp("-") || IsOp("+")) {
      const bool neg = IsOp("-");
      ++tok_;
      KVR_ASSIGN_OR_RETURN(NodePtr e, ParseUnary(false));
      n = Make(neg ? Node::K::kNeg : Node::K::kPos, p);
      n->kids.push_back(std::move(e));
    } else {
      KVR_ASSIGN_OR_RETURN(n, ParsePrimary());
    }
    KVR_ASSIGN_OR_RETURN(n, ParsePostfix(std::move(n)));
    if (with_filter) {
      KVR_ASSIGN_OR_RETURN(n, ParseFilterExpr(std::move(n)));
    }
    --depth_;
    return n;
  }

  absl::StatusOr<NodePtr> ParsePrimary() {
    const Token t = Cur();
    switch (t.type) {
      case Tok::kName: {
        ++tok_;
        if (t.text == "true" || t.text == "True") return Lit(Value::Bool(true), t.pos);
        if (t.text == "false" || t.text == "False") return Lit(Value::Bool(false), t.pos);
        if (t.text == "none" || t.text == "None") return Lit(Value::None(), t.pos);
        NodePtr n = Make(Node::K::kName, t.pos);
        n->name = t.text;
        return n;
      }
      case Tok::kString: {
        std::string s;
        while (Cur().type == Tok::kString) {
          s += Cur().text;
          ++tok_;
        }
        return Lit(Value::String(std::move(s)), t.pos);
      }
      case Tok::kInt:
        ++tok_;
        return Lit(Value::Int(t.i), t.pos);
      case Tok::kFloat:
        ++tok_;
        return Lit(Value::Float(t.d), t.pos);
      case Tok::kOp:
        if (t.text == "(") {
          ++tok_;
          if (IsOp(")")) {
            ++tok_;
            return Make(Node::K::kTuple, t.pos);
          }
          KVR_ASSIGN_OR_RETURN(NodePtr e, ParseExpr());
          if (IsOp(")")) {
            ++tok_;
            return e;
          }
          NodePtr tup = Make(Node::K::kTuple, t.pos);
          tup->kids.push_back(std::move(e));
          while (IsOp(",")) {
            ++tok_;
            if (IsOp(")")) break;
            KVR_ASSIGN_OR_RETURN(NodePtr x, ParseExpr());
            tup->kids.push_back(std::move(x));
          }
          KVR_RETURN_IF_ERROR(Expect(")"));
          return tup;
        }
        if (t.text == "[") {
          ++tok_;
          NodePtr l = Make(Node::K::kList, t.pos);
          while (!IsOp("]")) {
            KVR_ASSIGN_OR_RETURN(NodePtr x, ParseExpr());
            l->kids.push_back(std::move(x));
            if (!IsOp(",")) break;
            ++tok_;
          }
          KVR_RETURN_IF_ERROR(Expect("]"));
          return l;
        }
        if (t.text == "{") {
          ++tok_;
          NodePtr d = Make(Node::K::kDict, t.pos);
          while (!IsOp("}")) {
            KVR_ASSIGN_OR_RETURN(NodePtr k, ParseExpr());
            KVR_RETURN_IF_ERROR(Expect(":"));
            KVR_ASSIGN_OR_RETURN(NodePtr v, ParseExpr());
            d->kids.push_back(std::move(k));
            d->kids.push_back(std::move(v));
            if (!IsOp(",")) break;
            ++tok_;
          }
          KVR_RETURN_IF_ERROR(Expect("}"));
          return d;
        }
        break;
      case Tok::kEnd:
        return Error(t.pos, "unexpected end of tag, expected an expression");
    }
    return Error(t.pos, absl::StrCat("unexpected '", t.text, "'"));
  }

  NodePtr Lit(Value v, Pos p) {
    NodePtr n = Make(Node::K::kLiteral, p);
    n->value = std::move(v);
    return n;
  }

  absl::StatusOr<NodePtr> ParsePostfix(NodePtr n) {
    while (true) {
      const Token t = Cur();
      if (IsOp(".")) {
        ++tok_;
        if (Cur().type == Tok::kName) {
          NodePtr a = Make(Node::K::kAttr, t.pos);
          a->name = Cur().text;
          ++tok_;
          a->kids.push_back(std::move(n));
          n = std::move(a);
        } else if (Cur().type == Tok::kInt) {
          NodePtr s = Make(Node::K::kSubscript, t.pos);
          s->kids.push_back(std::move(n));
          s->kids.push_back(Lit(Value::Int(Cur().i), Cur().pos));
          ++tok_;
          n = std::move(s);
        } else {
          return Error(Cur().pos, "expected an attribute name after '.'");
        }
      } else if (IsOp("[")) {
        ++tok_;
        KVR_ASSIGN_OR_RETURN(NodePtr sub, ParseSubscript(t.pos));
        KVR_RETURN_IF_ERROR(Expect("]"));
        sub->kids.insert(sub->kids.begin(), std::move(n));
        n = std::move(sub);
      } else if (IsOp("(")) {
        KVR_ASSIGN_OR_RETURN(n, ParseCall(std::move(n)));
      } else {
        return n;
      }
    }
  }

  // [a] or [start:stop:step]; returns kSubscript {index} or kSlice {start,
  // stop, step} (nullptr for a missing part); the object is inserted first.
  absl::StatusOr<NodePtr> ParseSubscript(Pos p) {
    NodePtr parts[3];
    int part = 0;
    bool slice = false;
    while (true) {
      if (IsOp(":")) {
        slice = true;
        ++tok_;
        if (++part > 2) return Error(Cur().pos, "too many ':' in a slice");
        continue;
      }
      if (IsOp("]")) break;
      if (parts[part] != nullptr) return Error(Cur().pos, "expected ':' or ']'");
      KVR_ASSIGN_OR_RETURN(parts[part], ParseExpr());
    }
    if (!slice) {
      if (parts[0] == nullptr) return Error(p, "empty subscript");
      NodePtr s = Make(Node::K::kSubscript, p);
      s->kids.push_back(std::move(parts[0]));
      return s;
    }
    NodePtr s = Make(Node::K::kSlice, p);
    for (auto& x : parts) s->kids.push_back(std::move(x));
    return s;
  }

  // (args, name=value, ...) into a kCall {callee, args...}, names parallel.
  absl::StatusOr<NodePtr> ParseCall(NodePtr callee) {
    NodePtr c = Make(Node::K::kCall, Cur().pos);
    c->kids.push_back(std::move(callee));
    c->names.push_back("");  // names[i] is kids[i]'s keyword
    KVR_RETURN_IF_ERROR(ParseArgs(c.get()));
    return c;
  }

  absl::Status ParseArgs(Node* c) {
    KVR_RETURN_IF_ERROR(Expect("("));
    while (!IsOp(")")) {
      std::string kw;
      if (Cur().type == Tok::kName && Peek(1).type == Tok::kOp && Peek(1).text == "=") {
        kw = Cur().text;
        tok_ += 2;
      }
      KVR_ASSIGN_OR_RETURN(NodePtr a, ParseExpr());
      c->kids.push_back(std::move(a));
      c->names.push_back(kw);
      if (!IsOp(",")) break;
      ++tok_;
    }
    return Expect(")");
  }

  absl::StatusOr<NodePtr> ParseFilterExpr(NodePtr n) {
    while (true) {
      if (IsOp("|")) {
        ++tok_;
        if (Cur().type != Tok::kName) return Error(Cur().pos, "expected a filter name");
        NodePtr f = Make(Node::K::kFilter, Cur().pos);
        f->name = Cur().text;
        ++tok_;
        while (IsOp(".")) {  // dotted filter names
          ++tok_;
          if (Cur().type != Tok::kName) return Error(Cur().pos, "expected a name");
          f->name += "." + Cur().text;
          ++tok_;
        }
        f->kids.push_back(std::move(n));
        f->names.push_back("");
        if (IsOp("(")) KVR_RETURN_IF_ERROR(ParseArgs(f.get()));
        n = std::move(f);
      } else if (IsName("is")) {
        ++tok_;
        NodePtr t = Make(Node::K::kTest, Cur().pos);
        if (IsName("not")) {
          t->negated = true;
          ++tok_;
        }
        if (Cur().type != Tok::kName) return Error(Cur().pos, "expected a test name");
        t->name = Cur().text;
        ++tok_;
        t->kids.push_back(std::move(n));
        t->names.push_back("");
        if (IsOp("(")) {
          KVR_RETURN_IF_ERROR(ParseArgs(t.get()));
        } else if ((Cur().type == Tok::kName || Cur().type == Tok::kString ||
                    Cur().type == Tok::kInt || Cur().type == Tok::kFloat || IsOp("[") ||
                    IsOp("{")) &&
                   !IsName("else") && !IsName("or") && !IsName("and") && !IsName("is") &&
                   !IsName("if")) {
          KVR_ASSIGN_OR_RETURN(NodePtr a, ParsePrimary());
          KVR_ASSIGN_OR_RETURN(a, ParsePostfix(std::move(a)));
          t->kids.push_back(std::move(a));
          t->names.push_back("");
        }
        n = std::move(t);
      } else if (IsOp("(")) {
        KVR_ASSIGN_OR_RETURN(n, ParseCall(std::move(n)));
      } else {
        return n;
      }
    }
  }

  std::vector<Piece> pieces_;
  const Limits& limits_;
  size_t piece_ = 0;
  std::vector<Token>* toks_ = nullptr;
  size_t tok_ = 0;
  int depth_ = 0;
  int loops_ = 0;
};

}  // namespace

// ---------------------------------------------------------------- interpreter

namespace {

enum class Flow : uint8_t { kNormal, kBreak, kContinue };

using Scope = std::map<std::string, Value, std::less<>>;

class Renderer {
 public:
  Renderer(const Limits& limits, const Value& globals) : limits_(limits), globals_(globals) {
    scopes_.push_back(std::make_shared<Scope>());
  }

  absl::Status Run(const Node& body, std::string* out) {
    Flow flow = Flow::kNormal;
    return Exec(body, out, &flow);
  }

 private:
  absl::Status Error(Pos p, absl::string_view msg) const {
    return absl::InvalidArgumentError(absl::StrCat(At(p), msg));
  }
  // Adds the position to an error from a builtin (raise_exception's
  // FailedPrecondition is passed on unchanged: its message is the user's).
  absl::Status Located(Pos p, const absl::Status& s) const {
    if (s.ok() || s.code() == absl::StatusCode::kFailedPrecondition ||
        absl::StartsWith(s.message(), "template:")) {
      return s;
    }
    return absl::Status(s.code(), absl::StrCat(At(p), s.message()));
  }

  absl::Status CheckSize(Pos p, size_t bytes) const {
    if (bytes > limits_.max_output_bytes) {
      return Error(p, absl::StrCat("string of ", bytes, " bytes exceeds max_output_bytes ",
                                   limits_.max_output_bytes));
    }
    return absl::OkStatus();
  }
  absl::Status CheckCount(Pos p, size_t n) const {
    if (n > static_cast<size_t>(limits_.max_loop_iterations)) {
      return Error(p, absl::StrCat("sequence of ", n, " items exceeds max_loop_iterations ",
                                   limits_.max_loop_iterations));
    }
    return absl::OkStatus();
  }

  Value Lookup(absl::string_view name) const {
    for (auto it = scopes_.rbegin(); it != scopes_.rend(); ++it) {
      auto f = (*it)->find(name);
      if (f != (*it)->end()) return f->second;
    }
    if (globals_.is_mapping()) {
      if (const Value* v = globals_.dict().Find(name)) return *v;
    }
    return Value();
  }

  absl::Status Write(Pos p, absl::string_view s, std::string* out) {
    if (out->size() + s.size() > limits_.max_output_bytes) {
      return Error(p, absl::StrCat("output exceeds max_output_bytes ", limits_.max_output_bytes));
    }
    out->append(s.data(), s.size());
    return absl::OkStatus();
  }

  absl::Status Exec(const Node& n, std::string* out, Flow* flow) {
    switch (n.kind) {
      case Node::K::kBody:
        for (const auto& k : n.kids) {
          KVR_RETURN_IF_ERROR(Exec(*k, out, flow));
          if (*flow != Flow::kNormal) return absl::OkStatus();
        }
        return absl::OkStatus();
      case Node::K::kText:
        return Write(n.pos, n.value.str(), out);
      case Node::K::kOutput: {
        KVR_ASSIGN_OR_RETURN(Value v, Eval(*n.kids[0]));
        return Write(n.pos, v.ToString(), out);
      }
      case Node::K::kIf: {
        size_t i = 0;
        for (; i + 1 < n.kids.size(); i += 2) {
          KVR_ASSIGN_OR_RETURN(Value c, Eval(*n.kids[i]));
          if (c.Truthy()) return Exec(*n.kids[i + 1], out, flow);
        }
        if (i < n.kids.size()) return Exec(*n.kids[i], out, flow);
        return absl::OkStatus();
      }
      case Node::K::kFor:
        return ExecFor(n, out);
      case Node::K::kSet: {
        KVR_ASSIGN_OR_RETURN(Value v, Eval(*n.kids[0]));
        return Assign(n, std::move(v));
      }
      case Node::K::kSetBlock: {
        std::string text;
        Flow f = Flow::kNormal;
        KVR_RETURN_IF_ERROR(Exec(*n.kids[0], &text, &f));
        return Assign(n, Value::String(std::move(text)));
      }
      case Node::K::kMacro: {
        const Node* node = &n;
        // Weak: the macro is stored in a scope its closure would otherwise
        // keep alive (a cycle). The root scope outlives every call.
        std::weak_ptr<Scope> root = scopes_.front();
        (*scopes_.back())[n.name] = Value::MakeCallable(
            [this, node, root](CallArgs& args) -> absl::StatusOr<Value> {
              std::shared_ptr<Scope> r = root.lock();
              if (r == nullptr) return absl::InvalidArgumentError("macro called after its render ended");
              return CallMacro(*node, {r}, args);
            },
            n.name);
        return absl::OkStatus();
      }
      case Node::K::kBreak:
        *flow = Flow::kBreak;
        return absl::OkStatus();
      case Node::K::kContinue:
        *flow = Flow::kContinue;
        return absl::OkStatus();
      default:
        return Error(n.pos, "not a statement");
    }
  }

  absl::Status Assign(const Node& n, Value v) {
    if (!n.attr.empty()) {
      Value target = Lookup(n.name);
      if (target.kind() != Value::Kind::kNamespace) {
        return Error(n.pos, absl::StrCat("cannot assign attribute on non-namespace object '", n.name, "'"));
      }
      target.mutable_dict().Set(n.attr, std::move(v));
      return absl::OkStatus();
    }
    Scope& scope = *scopes_.back();
    if (n.names.size() == 1) {
      scope[n.names[0]] = std::move(v);
      return absl::OkStatus();
    }
    if (!v.is_list() || v.list().size() != n.names.size()) {
      return Error(n.pos, absl::StrCat("cannot unpack into ", n.names.size(), " names"));
    }
    for (size_t i = 0; i < n.names.size(); ++i) scope[n.names[i]] = v.list()[i];
    return absl::OkStatus();
  }

  absl::StatusOr<List> Iterate(Pos p, const Value& v) const {
    switch (v.kind()) {
      case Value::Kind::kList:
        return v.list();
      case Value::Kind::kDict:
      case Value::Kind::kNamespace: {
        List keys;
        for (const auto& [k, x] : v.dict().items) keys.push_back(Value::String(k));
        return keys;
      }
      case Value::Kind::kString: {
        KVR_RETURN_IF_ERROR(CheckCount(p, CharOffsets(v.str()).size()));
        List chars;
        const std::string& s = v.str();
        for (size_t i = 0; i < s.size();) {
          size_t len = 1;
          const unsigned char c = static_cast<unsigned char>(s[i]);
          if (c >= 0xF0) {
            len = 4;
          } else if (c >= 0xE0) {
            len = 3;
          } else if (c >= 0xC0) {
            len = 2;
          }
          len = std::min(len, s.size() - i);
          chars.push_back(Value::String(s.substr(i, len)));
          i += len;
        }
        return chars;
      }
      case Value::Kind::kUndefined:
        return List{};
      default:
        return Error(p, absl::StrCat("'", TypeName(v), "' object is not iterable"));
    }
  }

  static std::string TypeName(const Value& v) {
    switch (v.kind()) {
      case Value::Kind::kUndefined: return "Undefined";
      case Value::Kind::kNone: return "NoneType";
      case Value::Kind::kBool: return "bool";
      case Value::Kind::kInt: return "int";
      case Value::Kind::kFloat: return "float";
      case Value::Kind::kString: return "str";
      case Value::Kind::kList: return v.is_tuple() ? "tuple" : "list";
      case Value::Kind::kDict: return "dict";
      case Value::Kind::kNamespace: return "Namespace";
      case Value::Kind::kCallable: return "function";
    }
    return "?";
  }

  absl::Status Tick(Pos p) {
    if (++iterations_ > limits_.max_loop_iterations) {
      return Error(p, absl::StrCat("loop iterations exceed max_loop_iterations ",
                                   limits_.max_loop_iterations));
    }
    return absl::OkStatus();
  }

  absl::Status Bind(const Node& n, Scope* scope, const Value& item) {
    if (n.names.size() == 1) {
      (*scope)[n.names[0]] = item;
      return absl::OkStatus();
    }
    if (!item.is_list() || item.list().size() != n.names.size()) {
      return Error(n.pos, absl::StrCat("cannot unpack a loop item into ", n.names.size(), " names"));
    }
    for (size_t i = 0; i < n.names.size(); ++i) (*scope)[n.names[i]] = item.list()[i];
    return absl::OkStatus();
  }

  absl::Status ExecFor(const Node& n, std::string* out) {
    KVR_ASSIGN_OR_RETURN(Value seq, Eval(*n.kids[0]));
    KVR_ASSIGN_OR_RETURN(List items, Iterate(n.pos, seq));
    if (n.kids[1] != nullptr) {  // `for x in xs if cond`: filter first
      List kept;
      for (const Value& item : items) {
        KVR_RETURN_IF_ERROR(Tick(n.pos));
        scopes_.push_back(std::make_shared<Scope>());
        absl::Status st = Bind(n, scopes_.back().get(), item);
        absl::StatusOr<Value> c = st.ok() ? Eval(*n.kids[1]) : absl::StatusOr<Value>(st);
        scopes_.pop_back();
        if (!c.ok()) return c.status();
        if (c->Truthy()) kept.push_back(item);
      }
      items = std::move(kept);
    }
    const Node& body = *n.kids[2];
    if (items.empty()) {
      if (n.kids.size() > 3) {
        Flow f = Flow::kNormal;
        return Exec(*n.kids[3], out, &f);
      }
      return absl::OkStatus();
    }
    const int64_t len = static_cast<int64_t>(items.size());
    for (int64_t i = 0; i < len; ++i) {
      KVR_RETURN_IF_ERROR(Tick(n.pos));
      auto scope = std::make_shared<Scope>();
      KVR_RETURN_IF_ERROR(Bind(n, scope.get(), items[static_cast<size_t>(i)]));
      auto loop = std::make_shared<Dict>();
      loop->Set("index0", Value::Int(i));
      loop->Set("index", Value::Int(i + 1));
      loop->Set("revindex0", Value::Int(len - i - 1));
      loop->Set("revindex", Value::Int(len - i));
      loop->Set("first", Value::Bool(i == 0));
      loop->Set("last", Value::Bool(i == len - 1));
      loop->Set("length", Value::Int(len));
      loop->Set("depth", Value::Int(1));
      loop->Set("depth0", Value::Int(0));
      loop->Set("previtem", i > 0 ? items[static_cast<size_t>(i - 1)] : Value());
      loop->Set("nextitem", i + 1 < len ? items[static_cast<size_t>(i + 1)] : Value());
      (*scope)["loop"] = Value::MakeDict(std::move(loop));
      scopes_.push_back(std::move(scope));
      Flow f = Flow::kNormal;
      absl::Status st = Exec(body, out, &f);
      scopes_.pop_back();
      KVR_RETURN_IF_ERROR(st);
      if (f == Flow::kBreak) break;
    }
    return absl::OkStatus();
  }

  absl::StatusOr<Value> CallMacro(const Node& m, const std::vector<std::shared_ptr<Scope>>& closure,
                                  CallArgs& args) {
    if (++call_depth_ > limits_.max_call_depth) {
      --call_depth_;
      return Error(m.pos, absl::StrCat("macro calls nested deeper than max_call_depth ",
                                       limits_.max_call_depth));
    }
    auto locals = std::make_shared<Scope>();
    if (args.args.size() > m.names.size()) {
      --call_depth_;
      return Error(m.pos, absl::StrCat("macro '", m.name, "' takes at most ", m.names.size(),
                                       " arguments"));
    }
    std::vector<std::shared_ptr<Scope>> saved = std::move(scopes_);
    scopes_ = closure;
    scopes_.push_back(locals);
    absl::Status st;
    for (size_t i = 0; i < m.names.size() && st.ok(); ++i) {
      const Value& a = args.Get(i, m.names[i]);
      if (!a.is_undefined()) {
        (*locals)[m.names[i]] = a;
      } else if (m.kids[i + 1] != nullptr) {
        absl::StatusOr<Value> d = Eval(*m.kids[i + 1]);
        if (d.ok()) {
          (*locals)[m.names[i]] = *d;
        } else {
          st = d.status();
        }
      }
    }
    std::string text;
    if (st.ok()) {
      Flow f = Flow::kNormal;
      st = Exec(*m.kids[0], &text, &f);
    }
    scopes_ = std::move(saved);
    --call_depth_;
    KVR_RETURN_IF_ERROR(st);
    return Value::String(std::move(text));
  }

  absl::StatusOr<Value> Eval(const Node& n) {
    switch (n.kind) {
      case Node::K::kLiteral:
        return n.value;
      case Node::K::kName: {
        Value v = Lookup(n.name);
        if (v.is_undefined()) return Builtin(n.name);
        return v;
      }
      case Node::K::kList:
      case Node::K::kTuple: {
        List items;
        for (const auto& k : n.kids) {
          KVR_ASSIGN_OR_RETURN(Value v, Eval(*k));
          items.push_back(std::move(v));
        }
        return Value::MakeList(std::move(items), n.kind == Node::K::kTuple);
      }
      case Node::K::kDict: {
        auto d = std::make_shared<Dict>();
        for (size_t i = 0; i + 1 < n.kids.size(); i += 2) {
          KVR_ASSIGN_OR_RETURN(Value k, Eval(*n.kids[i]));
          KVR_ASSIGN_OR_RETURN(Value v, Eval(*n.kids[i + 1]));
          if (!k.is_string()) return Error(n.kids[i]->pos, "dict keys must be strings");
          d->Set(k.str(), std::move(v));
        }
        return Value::MakeDict(std::move(d));
      }
      case Node::K::kAttr: {
        KVR_ASSIGN_OR_RETURN(Value obj, Eval(*n.kids[0]));
        return GetAttr(n.pos, obj, n.name, /*subscript=*/false);
      }
      case Node::K::kSubscript: {
        KVR_ASSIGN_OR_RETURN(Value obj, Eval(*n.kids[0]));
        KVR_ASSIGN_OR_RETURN(Value key, Eval(*n.kids[1]));
        return GetItem(n.pos, obj, key);
      }
      case Node::K::kSlice:
        return EvalSlice(n);
      case Node::K::kCall: {
        KVR_ASSIGN_OR_RETURN(Value callee, Eval(*n.kids[0]));
        if (callee.kind() != Value::Kind::kCallable) {
          if (callee.is_undefined()) {
            return Error(n.pos, absl::StrCat("'", NameOf(*n.kids[0]), "' is undefined"));
          }
          return Error(n.pos, absl::StrCat("'", TypeName(callee), "' object is not callable"));
        }
        CallArgs args;
        KVR_RETURN_IF_ERROR(EvalArgs(n, 1, &args));
        absl::StatusOr<Value> r = callee.fn()(args);
        if (!r.ok()) return Located(n.pos, r.status());
        return r;
      }
      case Node::K::kFilter: {
        KVR_ASSIGN_OR_RETURN(Value v, Eval(*n.kids[0]));
        CallArgs args;
        args.args.push_back(v);
        KVR_RETURN_IF_ERROR(EvalArgs(n, 1, &args));
        absl::StatusOr<Value> r = ApplyFilter(n.pos, n.name, v, args);
        if (!r.ok()) return Located(n.pos, r.status());
        return r;
      }
      case Node::K::kTest: {
        KVR_ASSIGN_OR_RETURN(Value v, Eval(*n.kids[0]));
        CallArgs args;
        args.args.push_back(v);
        KVR_RETURN_IF_ERROR(EvalArgs(n, 1, &args));
        KVR_ASSIGN_OR_RETURN(bool b, ApplyTest(n.pos, n.name, v, args));
        return Value::Bool(b != n.negated);
      }
      case Node::K::kNeg:
      case Node::K::kPos: {
        KVR_ASSIGN_OR_RETURN(Value v, Eval(*n.kids[0]));
        if (!v.is_number()) return Error(n.pos, absl::StrCat("bad operand type for unary -: '", TypeName(v), "'"));
        if (n.kind == Node::K::kPos) return v.kind() == Value::Kind::kBool ? Value::Int(v.int_value()) : v;
        if (v.kind() == Value::Kind::kFloat) return Value::Float(-v.float_value());
        if (v.int_value() == std::numeric_limits<int64_t>::min()) return Error(n.pos, "integer overflow");
        return Value::Int(-v.int_value());
      }
      case Node::K::kNot: {
        KVR_ASSIGN_OR_RETURN(Value v, Eval(*n.kids[0]));
        return Value::Bool(!v.Truthy());
      }
      case Node::K::kAnd: {
        KVR_ASSIGN_OR_RETURN(Value l, Eval(*n.kids[0]));
        if (!l.Truthy()) return l;
        return Eval(*n.kids[1]);
      }
      case Node::K::kOr: {
        KVR_ASSIGN_OR_RETURN(Value l, Eval(*n.kids[0]));
        if (l.Truthy()) return l;
        return Eval(*n.kids[1]);
      }
      case Node::K::kCond: {
        KVR_ASSIGN_OR_RETURN(Value c, Eval(*n.kids[1]));
        if (c.Truthy()) return Eval(*n.kids[0]);
        if (n.kids.size() > 2) return Eval(*n.kids[2]);
        return Value();
      }
      case Node::K::kCompare: {
        KVR_ASSIGN_OR_RETURN(Value l, Eval(*n.kids[0]));
        for (size_t i = 0; i < n.names.size(); ++i) {
          KVR_ASSIGN_OR_RETURN(Value r, Eval(*n.kids[i + 1]));
          KVR_ASSIGN_OR_RETURN(bool ok, Compare(n.pos, n.names[i], l, r));
          if (!ok) return Value::Bool(false);
          l = std::move(r);
        }
        return Value::Bool(true);
      }
      case Node::K::kBinary: {
        KVR_ASSIGN_OR_RETURN(Value l, Eval(*n.kids[0]));
        KVR_ASSIGN_OR_RETURN(Value r, Eval(*n.kids[1]));
        return Binary(n.pos, n.name, l, r);
      }
      default:
        return Error(n.pos, "not an expression");
    }
  }

  static std::string NameOf(const Node& n) {
    if (n.kind == Node::K::kName || n.kind == Node::K::kAttr) return n.name;
    return "value";
  }

  absl::Status EvalArgs(const Node& n, size_t from, CallArgs* args) {
    for (size_t i = from; i < n.kids.size(); ++i) {
      KVR_ASSIGN_OR_RETURN(Value v, Eval(*n.kids[i]));
      const std::string& kw = i < n.names.size() ? n.names[i] : std::string();
      if (kw.empty()) {
        if (!args->kwargs.empty()) return Error(n.kids[i]->pos, "positional argument follows keyword argument");
        args->args.push_back(std::move(v));
      } else {
        args->kwargs.emplace_back(kw, std::move(v));
      }
    }
    return absl::OkStatus();
  }

  // Globals every template has: range, namespace, dict.
  Value Builtin(const std::string& name) {
    if (name == "namespace" || name == "dict") {
      const bool ns = name == "namespace";
      return Value::MakeCallable(
          [ns](CallArgs& a) -> absl::StatusOr<Value> {
            auto d = std::make_shared<Dict>();
            for (const Value& p : a.args) {  // namespace({...}) / dict({...})
              if (!p.is_mapping()) return absl::InvalidArgumentError("expected a mapping argument");
              for (const auto& [k, v] : p.dict().items) d->Set(k, v);
            }
            for (auto& [k, v] : a.kwargs) d->Set(k, v);
            return ns ? Value::MakeNamespace(std::move(d)) : Value::MakeDict(std::move(d));
          },
          name);
    }
    if (name == "range") {
      const int64_t cap = limits_.max_loop_iterations;
      return Value::MakeCallable(
          [cap](CallArgs& a) -> absl::StatusOr<Value> {
            int64_t start = 0, stop = 0, step = 1;
            for (const Value& v : a.args) {
              if (v.kind() != Value::Kind::kInt && v.kind() != Value::Kind::kBool) {
                return absl::InvalidArgumentError("range: expected integers");
              }
            }
            if (a.args.size() == 1) {
              stop = a.args[0].int_value();
            } else if (a.args.size() == 2 || a.args.size() == 3) {
              start = a.args[0].int_value();
              stop = a.args[1].int_value();
              if (a.args.size() == 3) step = a.args[2].int_value();
            } else {
              return absl::InvalidArgumentError("range: expected 1 to 3 arguments");
            }
            if (step == 0) return absl::InvalidArgumentError("range: step must not be zero");
            List out;
            for (int64_t i = start; step > 0 ? i < stop : i > stop;) {
              if (static_cast<int64_t>(out.size()) >= cap) {
                return absl::InvalidArgumentError(
                    absl::StrCat("range: more than max_loop_iterations ", cap, " items"));
              }
              out.push_back(Value::Int(i));
              if (__builtin_add_overflow(i, step, &i)) break;
            }
            return Value::MakeList(std::move(out));
          },
          name);
    }
    return Value();
  }

  absl::StatusOr<Value> GetItem(Pos p, const Value& obj, const Value& key) {
    if (obj.is_list() || obj.is_string()) {
      if (key.kind() != Value::Kind::kInt && key.kind() != Value::Kind::kBool) {
        if (key.is_string()) return GetAttr(p, obj, key.str(), true);
        return Error(p, absl::StrCat(TypeName(obj), " indices must be integers"));
      }
      if (obj.is_string()) {
        const std::vector<size_t> at = CharOffsets(obj.str());
        const int64_t size = static_cast<int64_t>(at.size());
        int64_t i = key.int_value();
        if (i < 0) i += size;
        if (i < 0 || i >= size) return Value();  // jinja2: undefined
        const size_t from = at[static_cast<size_t>(i)];
        const size_t to = static_cast<size_t>(i) + 1 < at.size() ? at[static_cast<size_t>(i) + 1] : obj.str().size();
        return Value::String(obj.str().substr(from, to - from));
      }
      const int64_t size = static_cast<int64_t>(obj.list().size());
      int64_t i = key.int_value();
      if (i < 0) i += size;
      if (i < 0 || i >= size) return Value();  // jinja2: undefined
      return obj.list()[static_cast<size_t>(i)];
    }
    if (obj.is_mapping()) {
      if (key.is_string()) {
        if (const Value* v = obj.dict().Find(key.str())) return *v;
        return GetAttr(p, obj, key.str(), true);
      }
      return Value();
    }
    if (obj.is_undefined()) return Error(p, "cannot subscript an undefined value");
    return Value();
  }

  absl::StatusOr<Value> GetAttr(Pos p, const Value& obj, const std::string& name, bool from_subscript) {
    if (obj.is_undefined()) {
      return Error(p, absl::StrCat("undefined value has no attribute '", name, "'"));
    }
    if (obj.is_mapping()) {
      if (!from_subscript) {
        if (const Value* v = obj.dict().Find(name)) {
          if (obj.kind() == Value::Kind::kNamespace) return *v;
        }
      }
      if (obj.kind() == Value::Kind::kDict) {
        Value m = DictMethod(obj, name);
        if (!m.is_undefined()) return m;
      }
      if (const Value* v = obj.dict().Find(name)) return *v;
      return Value();
    }
    if (obj.is_string()) return StringMethod(obj, name);
    return Value();
  }

  static Value DictMethod(const Value& obj, const std::string& name) {
    if (name == "get") {
      return Value::MakeCallable(
          [obj](CallArgs& a) -> absl::StatusOr<Value> {
            if (a.args.empty() || a.args.size() > 2) return absl::InvalidArgumentError("get: expected 1 or 2 arguments");
            if (a.args[0].is_string()) {
              if (const Value* v = obj.dict().Find(a.args[0].str())) return *v;
            }
            return a.args.size() > 1 ? a.args[1] : Value::None();
          },
          name);
    }
    if (name == "items" || name == "keys" || name == "values") {
      return Value::MakeCallable(
          [obj, name](CallArgs&) -> absl::StatusOr<Value> {
            List out;
            for (const auto& [k, v] : obj.dict().items) {
              if (name == "items") {
                out.push_back(Value::MakeList({Value::String(k), v}, true));
              } else {
                out.push_back(name == "keys" ? Value::String(k) : v);
              }
            }
            return Value::MakeList(std::move(out));
          },
          name);
    }
    return Value();
  }

  // str.strip([chars]) by code point: Python's Unicode whitespace, or the
  // code points of `chars`.
  static std::string StripChars(const std::string& s, const Value& chars, bool left, bool right) {
    std::vector<std::pair<size_t, uint32_t>> cps;  // (byte offset, code point)
    for (size_t i = 0; i < s.size();) {
      const size_t at = i;
      cps.emplace_back(at, DecodeUtf8(s, &i));
    }
    std::vector<uint32_t> set;
    if (chars.is_string()) {
      for (size_t i = 0; i < chars.str().size();) set.push_back(DecodeUtf8(chars.str(), &i));
    }
    auto strip = [&](uint32_t cp) {
      if (chars.is_string()) return std::find(set.begin(), set.end(), cp) != set.end();
      return IsPySpace(cp);
    };
    size_t b = 0, e = cps.size();
    if (left) {
      while (b < e && strip(cps[b].second)) ++b;
    }
    if (right) {
      while (e > b && strip(cps[e - 1].second)) --e;
    }
    const size_t from = b < cps.size() ? cps[b].first : s.size();
    const size_t to = e < cps.size() ? cps[e].first : s.size();
    return s.substr(from, to - from);
  }

  static std::string Title(const std::string& s) {
    std::string out = s;
    bool prev_cased = false;
    for (char& c : out) {
      const bool alpha = absl::ascii_isalpha(static_cast<unsigned char>(c));
      if (alpha) c = prev_cased ? absl::ascii_tolower(static_cast<unsigned char>(c))
                               : absl::ascii_toupper(static_cast<unsigned char>(c));
      prev_cased = alpha;
    }
    return out;
  }

  static absl::StatusOr<Value> Split(const std::string& s, const Value& sep, const Value& maxsplit) {
    int64_t max = maxsplit.kind() == Value::Kind::kInt ? maxsplit.int_value() : -1;
    List out;
    if (!sep.is_string() || sep.is_none()) {
      size_t i = 0;
      while (true) {
        while (i < s.size() && IsSpace(s[i])) ++i;
        if (i >= s.size()) break;
        if (max == 0) {
          size_t e = s.size();
          while (e > i && IsSpace(s[e - 1])) --e;
          out.push_back(Value::String(s.substr(i, e - i)));
          break;
        }
        size_t j = i;
        while (j < s.size() && !IsSpace(s[j])) ++j;
        out.push_back(Value::String(s.substr(i, j - i)));
        --max;
        i = j;
      }
      return Value::MakeList(std::move(out));
    }
    if (sep.str().empty()) return absl::InvalidArgumentError("split: empty separator");
    size_t i = 0;
    while (true) {
      const size_t j = max == 0 ? std::string::npos : s.find(sep.str(), i);
      if (j == std::string::npos) {
        out.push_back(Value::String(s.substr(i)));
        break;
      }
      out.push_back(Value::String(s.substr(i, j - i)));
      --max;
      i = j + sep.str().size();
    }
    return Value::MakeList(std::move(out));
  }

  Value StringMethod(const Value& obj, const std::string& name) {
    const std::string& s = obj.str();
    auto method = [&](std::function<absl::StatusOr<Value>(CallArgs&)> f) {
      return Value::MakeCallable(std::move(f), name);
    };
    if (name == "strip" || name == "lstrip" || name == "rstrip") {
      const bool l = name != "rstrip", r = name != "lstrip";
      return method([s, l, r](CallArgs& a) -> absl::StatusOr<Value> {
        return Value::String(StripChars(s, a.Get(0, "chars"), l, r));
      });
    }
    if (name == "upper" || name == "lower") {
      const bool up = name == "upper";
      return method([s, up](CallArgs&) -> absl::StatusOr<Value> {
        return Value::String(up ? absl::AsciiStrToUpper(s) : absl::AsciiStrToLower(s));
      });
    }
    if (name == "title") {
      return method([s](CallArgs&) -> absl::StatusOr<Value> { return Value::String(Title(s)); });
    }
    if (name == "capitalize") {
      return method([s](CallArgs&) -> absl::StatusOr<Value> {
        std::string out = absl::AsciiStrToLower(s);
        if (!out.empty()) out[0] = absl::ascii_toupper(static_cast<unsigned char>(out[0]));
        return Value::String(out);
      });
    }
    if (name == "startswith" || name == "endswith") {
      const bool start = name == "startswith";
      return method([s, start](CallArgs& a) -> absl::StatusOr<Value> {
        const Value& x = a.Get(0, "prefix");
        List options = x.is_list() ? x.list() : List{x};
        for (const Value& o : options) {
          if (!o.is_string()) return absl::InvalidArgumentError("startswith/endswith: expected a string");
          if (start ? absl::StartsWith(s, o.str()) : absl::EndsWith(s, o.str())) return Value::Bool(true);
        }
        return Value::Bool(false);
      });
    }
    if (name == "split") {
      return method([s](CallArgs& a) -> absl::StatusOr<Value> {
        return Split(s, a.Get(0, "sep"), a.Get(1, "maxsplit"));
      });
    }
    if (name == "replace") {
      const size_t cap = limits_.max_output_bytes;
      return method([s, cap](CallArgs& a) -> absl::StatusOr<Value> { return Replace(s, a, cap); });
    }
    if (name == "find" || name == "count") {
      const bool find = name == "find";
      return method([s, find](CallArgs& a) -> absl::StatusOr<Value> {
        const Value& x = a.Get(0, "sub");
        if (!x.is_string()) return absl::InvalidArgumentError("expected a string argument");
        if (find) {
          const size_t at = s.find(x.str());
          return Value::Int(at == std::string::npos ? -1 : static_cast<int64_t>(at));
        }
        if (x.str().empty()) return Value::Int(static_cast<int64_t>(s.size()) + 1);
        int64_t c = 0;
        for (size_t at = s.find(x.str()); at != std::string::npos; at = s.find(x.str(), at + x.str().size())) ++c;
        return Value::Int(c);
      });
    }
    return Value();
  }

  static absl::StatusOr<Value> Replace(const std::string& s, CallArgs& a, size_t cap) {
    const Value& from = a.Get(0, "old");
    const Value& to = a.Get(1, "new");
    if (!from.is_string() || !to.is_string()) return absl::InvalidArgumentError("replace: expected strings");
    int64_t count = a.Get(2, "count").kind() == Value::Kind::kInt ? a.Get(2, "count").int_value() : -1;
    std::string out;
    if (from.str().empty()) {
      // Python inserts `new` between every character (and at both ends).
      for (size_t i = 0; i <= s.size(); ++i) {
        if (count != 0) {
          out += to.str();
          --count;
        }
        if (i < s.size()) out += s[i];
        if (out.size() > cap) return absl::InvalidArgumentError(absl::StrCat("replace: result exceeds max_output_bytes ", cap));
      }
      return Value::String(std::move(out));
    }
    size_t i = 0;
    while (count != 0) {
      const size_t j = s.find(from.str(), i);
      if (j == std::string::npos) break;
      out.append(s, i, j - i);
      out += to.str();
      if (out.size() > cap) return absl::InvalidArgumentError(absl::StrCat("replace: result exceeds max_output_bytes ", cap));
      i = j + from.str().size();
      --count;
    }
    out.append(s, i, std::string::npos);
    if (out.size() > cap) return absl::InvalidArgumentError(absl::StrCat("replace: result exceeds max_output_bytes ", cap));
    return Value::String(std::move(out));
  }

  absl::StatusOr<Value> EvalSlice(const Node& n) {
    KVR_ASSIGN_OR_RETURN(Value obj, Eval(*n.kids[0]));
    int64_t part[3] = {0, 0, 1};
    bool has[3] = {false, false, false};
    for (int i = 0; i < 3; ++i) {
      if (n.kids[static_cast<size_t>(i) + 1] == nullptr) continue;
      KVR_ASSIGN_OR_RETURN(Value v, Eval(*n.kids[static_cast<size_t>(i) + 1]));
      if (v.is_none()) continue;
      if (v.kind() != Value::Kind::kInt && v.kind() != Value::Kind::kBool) {
        return Error(n.pos, "slice indices must be integers or None");
      }
      part[i] = v.int_value();
      has[i] = true;
    }
    const int64_t step = has[2] ? part[2] : 1;
    if (step == 0) return Error(n.pos, "slice step cannot be zero");
    if (!obj.is_list() && !obj.is_string()) {
      return Error(n.pos, absl::StrCat("'", TypeName(obj), "' object is not subscriptable"));
    }
    std::vector<size_t> at;  // a string slices by code point
    if (obj.is_string()) at = CharOffsets(obj.str());
    const int64_t len = static_cast<int64_t>(obj.is_string() ? at.size() : obj.list().size());
    // Python's slice.indices.
    auto clamp = [&](int64_t v, bool present, int64_t dflt) {
      if (!present) return dflt;
      if (v < 0) {
        v += len;
        if (v < 0) v = step < 0 ? -1 : 0;
      } else if (v >= len) {
        v = step < 0 ? len - 1 : len;
      }
      return v;
    };
    const int64_t start = clamp(part[0], has[0], step < 0 ? len - 1 : 0);
    const int64_t stop = clamp(part[1], has[1], step < 0 ? -1 : len);
    std::vector<int64_t> idx;
    for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) idx.push_back(i);
    if (obj.is_list()) {
      List out;
      for (int64_t i : idx) out.push_back(obj.list()[static_cast<size_t>(i)]);
      return Value::MakeList(std::move(out), obj.is_tuple());
    }
    std::string out;
    for (int64_t i : idx) {
      const size_t k = static_cast<size_t>(i);
      const size_t to = k + 1 < at.size() ? at[k + 1] : obj.str().size();
      out.append(obj.str(), at[k], to - at[k]);
    }
    return Value::String(std::move(out));
  }

  absl::StatusOr<bool> Compare(Pos p, const std::string& op, const Value& l, const Value& r) {
    if (op == "==") return Equal(l, r);
    if (op == "!=") return !Equal(l, r);
    if (op == "in" || op == "notin") {
      bool found = false;
      if (r.is_string()) {
        if (!l.is_string()) return Error(p, "'in <string>' requires string as left operand");
        found = r.str().find(l.str()) != std::string::npos;
      } else if (r.is_list()) {
        for (const Value& x : r.list()) found = found || Equal(l, x);
      } else if (r.is_mapping()) {
        found = l.is_string() && r.dict().Find(l.str()) != nullptr;
      } else if (r.is_undefined()) {
        found = false;
      } else {
        return Error(p, absl::StrCat("argument of type '", TypeName(r), "' is not iterable"));
      }
      return op == "in" ? found : !found;
    }
    int c = 0;
    if (l.is_number() && r.is_number()) {
      const double a = l.float_value(), b = r.float_value();
      if (l.kind() != Value::Kind::kFloat && r.kind() != Value::Kind::kFloat) {
        c = l.int_value() < r.int_value() ? -1 : l.int_value() > r.int_value() ? 1 : 0;
      } else {
        c = a < b ? -1 : a > b ? 1 : 0;
        if (std::isnan(a) || std::isnan(b)) return false;
      }
    } else if (l.is_string() && r.is_string()) {
      c = l.str().compare(r.str());
      c = c < 0 ? -1 : c > 0 ? 1 : 0;
    } else {
      return Error(p, absl::StrCat("'", op, "' not supported between instances of '", TypeName(l),
                                   "' and '", TypeName(r), "'"));
    }
    if (op == "<") return c < 0;
    if (op == "<=") return c <= 0;
    if (op == ">") return c > 0;
    return c >= 0;
  }

  absl::StatusOr<Value> Binary(Pos p, const std::string& op, const Value& l, const Value& r) {
    using K = Value::Kind;
    if (op == "~") {
      std::string s = l.ToString() + r.ToString();
      KVR_RETURN_IF_ERROR(CheckSize(p, s.size()));
      return Value::String(std::move(s));
    }
    if (op == "+") {
      if (l.is_string() && r.is_string()) {
        KVR_RETURN_IF_ERROR(CheckSize(p, l.str().size() + r.str().size()));
        return Value::String(l.str() + r.str());
      }
      if (l.is_list() && r.is_list()) {
        KVR_RETURN_IF_ERROR(CheckCount(p, l.list().size() + r.list().size()));
        List out = l.list();
        out.insert(out.end(), r.list().begin(), r.list().end());
        return Value::MakeList(std::move(out), l.is_tuple());
      }
    }
    if (op == "*" && ((l.is_string() || l.is_list()) && (r.kind() == K::kInt || r.kind() == K::kBool))) {
      const int64_t times = std::max<int64_t>(0, r.int_value());
      if (l.is_string()) {
        if (times > 0 && l.str().size() > limits_.max_output_bytes / static_cast<uint64_t>(times)) {
          return CheckSize(p, limits_.max_output_bytes + 1);
        }
        std::string s;
        for (int64_t i = 0; i < times; ++i) s += l.str();
        return Value::String(std::move(s));
      }
      if (times > 0 && l.list().size() > static_cast<uint64_t>(limits_.max_loop_iterations) / static_cast<uint64_t>(times)) {
        return CheckCount(p, static_cast<size_t>(limits_.max_loop_iterations) + 1);
      }
      List out;
      for (int64_t i = 0; i < times; ++i) out.insert(out.end(), l.list().begin(), l.list().end());
      return Value::MakeList(std::move(out));
    }
    if (op == "%" && l.is_string()) return Error(p, "string formatting with '%' is not supported");
    if (!l.is_number() || !r.is_number()) {
      return Error(p, absl::StrCat("unsupported operand type(s) for ", op, ": '", TypeName(l), "' and '",
                                   TypeName(r), "'"));
    }
    const bool ints = l.kind() != K::kFloat && r.kind() != K::kFloat;
    if (op == "/") {
      if (r.float_value() == 0.0) return Error(p, "division by zero");
      return Value::Float(l.float_value() / r.float_value());
    }
    if (ints) {
      const int64_t a = l.int_value(), b = r.int_value();
      int64_t out = 0;
      if (op == "+") {
        if (__builtin_add_overflow(a, b, &out)) return Error(p, "integer overflow");
        return Value::Int(out);
      }
      if (op == "-") {
        if (__builtin_sub_overflow(a, b, &out)) return Error(p, "integer overflow");
        return Value::Int(out);
      }
      if (op == "*") {
        if (__builtin_mul_overflow(a, b, &out)) return Error(p, "integer overflow");
        return Value::Int(out);
      }
      if (op == "//" || op == "%") {
        if (b == 0) return Error(p, "integer division or modulo by zero");
        if (a == std::numeric_limits<int64_t>::min() && b == -1) return Error(p, "integer overflow");
        int64_t q = a / b, m = a % b;
        if (m != 0 && ((m < 0) != (b < 0))) {
          --q;
          m += b;
        }
        return Value::Int(op == "//" ? q : m);
      }
      if (op == "**") {
        if (b < 0) return Value::Float(std::pow(static_cast<double>(a), static_cast<double>(b)));
        int64_t acc = 1;
        for (int64_t i = 0; i < b; ++i) {
          if (__builtin_mul_overflow(acc, a, &acc)) return Error(p, "integer overflow");
          if (acc == 0 || acc == 1) break;
        }
        return Value::Int(acc);
      }
    }
    const double a = l.float_value(), b = r.float_value();
    if (op == "+") return Value::Float(a + b);
    if (op == "-") return Value::Float(a - b);
    if (op == "*") return Value::Float(a * b);
    if (op == "**") return Value::Float(std::pow(a, b));
    if (op == "//" || op == "%") {
      if (b == 0.0) return Error(p, "float division by zero");
      double m = std::fmod(a, b);
      if (m != 0.0 && ((m < 0) != (b < 0))) m += b;
      if (op == "%") return Value::Float(m);
      return Value::Float(std::floor((a - m) / b + 0.5));
    }
    return Error(p, absl::StrCat("unknown operator ", op));
  }

  absl::StatusOr<bool> ApplyTest(Pos p, const std::string& name, const Value& v, const CallArgs& a) {
    using K = Value::Kind;
    const Value& arg = a.args.size() > 1 ? a.args[1] : a.Get(99, "value");
    if (name == "defined") return !v.is_undefined();
    if (name == "undefined") return v.is_undefined();
    if (name == "none") return v.is_none();
    if (name == "string") return v.is_string();
    if (name == "mapping") return v.kind() == K::kDict;
    if (name == "iterable") return v.is_list() || v.is_string() || v.is_mapping() || v.is_undefined();
    if (name == "sequence") return v.is_list() || v.is_string() || v.kind() == K::kDict;
    if (name == "number") return v.is_number();
    if (name == "integer") return v.kind() == K::kInt;
    if (name == "float") return v.kind() == K::kFloat;
    if (name == "boolean") return v.kind() == K::kBool;
    if (name == "true") return v.kind() == K::kBool && v.bool_value();
    if (name == "false") return v.kind() == K::kBool && !v.bool_value();
    if (name == "callable") return v.kind() == K::kCallable;
    if (name == "lower" || name == "upper") {
      if (!v.is_string()) return false;
      return name == "lower" ? absl::AsciiStrToLower(v.str()) == v.str() : absl::AsciiStrToUpper(v.str()) == v.str();
    }
    if (name == "odd" || name == "even" || name == "divisibleby") {
      if (v.kind() != K::kInt && v.kind() != K::kBool) return Error(p, absl::StrCat("test ", name, ": expected an integer"));
      int64_t d = 2;
      if (name == "divisibleby") {
        if (arg.kind() != K::kInt || arg.int_value() == 0) return Error(p, "divisibleby: expected a non-zero integer");
        d = arg.int_value();
      }
      const int64_t m = d == -1 ? 0 : v.int_value() % d;
      return name == "odd" ? m != 0 : m == 0;
    }
    if (name == "equalto" || name == "eq" || name == "==" || name == "sameas") return Equal(v, arg);
    if (name == "ne" || name == "!=") return !Equal(v, arg);
    if (name == "lt" || name == "le" || name == "gt" || name == "ge" || name == "lessthan" || name == "greaterthan") {
      const std::string op = name == "lt" || name == "lessthan" ? "<" : name == "le" ? "<=" : name == "ge" ? ">=" : ">";
      return Compare(p, op, v, arg);
    }
    if (name == "in") return Compare(p, "in", v, arg);
    return Error(p, absl::StrCat("no test named '", name, "'"));
  }

  absl::StatusOr<Value> ApplyFilter(Pos p, const std::string& name, const Value& v, const CallArgs& a) {
    using K = Value::Kind;
    auto arg = [&](size_t i, absl::string_view kw) -> const Value& { return a.Get(i + 1, kw); };
    if (name == "trim") {
      if (!v.is_string()) return Value::String(StripChars(v.ToString(), arg(0, "chars"), true, true));
      return Value::String(StripChars(v.str(), arg(0, "chars"), true, true));
    }
    if (name == "length" || name == "count") {
      if (v.is_string()) {
        int64_t n = 0;
        for (unsigned char c : v.str()) n += (c & 0xC0) != 0x80;
        return Value::Int(n);
      }
      if (v.is_list()) return Value::Int(static_cast<int64_t>(v.list().size()));
      if (v.is_mapping()) return Value::Int(static_cast<int64_t>(v.dict().items.size()));
      if (v.is_undefined()) return Value::Int(0);
      return Error(p, absl::StrCat("object of type '", TypeName(v), "' has no len()"));
    }
    if (name == "upper") return Value::String(absl::AsciiStrToUpper(v.ToString()));
    if (name == "lower") return Value::String(absl::AsciiStrToLower(v.ToString()));
    if (name == "title") return Value::String(Title(v.ToString()));
    if (name == "capitalize") {
      std::string out = absl::AsciiStrToLower(v.ToString());
      if (!out.empty()) out[0] = absl::ascii_toupper(static_cast<unsigned char>(out[0]));
      return Value::String(out);
    }
    if (name == "string") return Value::String(v.ToString());
    if (name == "tojson") {
      const Value& ind = arg(0, "indent");
      int indent = -1;
      if (ind.kind() == K::kInt) {
        if (ind.int_value() < 0 || ind.int_value() > 16) return Error(p, "tojson: indent outside [0, 16]");
        indent = static_cast<int>(ind.int_value());
      }
      absl::StatusOr<std::string> s = ToJson(v, indent);
      if (!s.ok()) return Error(p, s.status().message());
      KVR_RETURN_IF_ERROR(CheckSize(p, s->size()));
      return Value::String(*std::move(s));
    }
    if (name == "default" || name == "d") {
      const bool boolean = arg(1, "boolean").Truthy();
      if (v.is_undefined() || (boolean && !v.Truthy())) {
        const Value& d = arg(0, "default_value");
        return d.is_undefined() ? Value::String("") : d;
      }
      return v;
    }
    if (name == "items") {
      if (v.is_undefined()) return Value::MakeList({});
      if (!v.is_mapping()) return Error(p, "items: expected a mapping");
      List out;
      for (const auto& [k, x] : v.dict().items) out.push_back(Value::MakeList({Value::String(k), x}, true));
      return Value::MakeList(std::move(out));
    }
    if (name == "list") {
      KVR_ASSIGN_OR_RETURN(List items, Iterate(p, v));
      return Value::MakeList(std::move(items));
    }
    if (name == "first" || name == "last") {
      KVR_ASSIGN_OR_RETURN(List items, Iterate(p, v));
      if (items.empty()) return Value();
      return name == "first" ? items.front() : items.back();
    }
    if (name == "reverse") {
      if (v.is_string()) {
        KVR_ASSIGN_OR_RETURN(List chars, Iterate(p, v));
        std::string out;
        for (auto it = chars.rbegin(); it != chars.rend(); ++it) out += it->str();
        return Value::String(out);
      }
      KVR_ASSIGN_OR_RETURN(List items, Iterate(p, v));
      std::reverse(items.begin(), items.end());
      return Value::MakeList(std::move(items));
    }
    if (name == "join") {
      KVR_ASSIGN_OR_RETURN(List items, Iterate(p, v));
      const Value& sep = arg(0, "d");
      const std::string s = sep.is_undefined() ? "" : sep.ToString();
      std::string out;
      for (size_t i = 0; i < items.size(); ++i) {
        if (i > 0) out += s;
        out += items[i].ToString();
        KVR_RETURN_IF_ERROR(CheckSize(p, out.size()));
      }
      return Value::String(std::move(out));
    }
    if (name == "replace") {
      CallArgs ra;
      ra.args = {arg(0, "old"), arg(1, "new")};
      if (!arg(2, "count").is_undefined()) ra.args.push_back(arg(2, "count"));
      absl::StatusOr<Value> r = Replace(v.ToString(), ra, limits_.max_output_bytes);
      if (!r.ok()) return Error(p, r.status().message());
      return r;
    }
    if (name == "int") {
      if (v.kind() == K::kFloat) {
        if (!(std::fabs(v.float_value()) < 9.2e18)) return Error(p, "int: value out of range");
        return Value::Int(static_cast<int64_t>(v.float_value()));
      }
      if (v.is_number()) return Value::Int(v.int_value());
      if (v.is_string()) {
        int64_t out = 0;
        const std::string s = StripChars(v.str(), Value(), true, true);
        auto [ptr, ec] = std::from_chars(s.data(), s.data() + s.size(), out);
        if (ec == std::errc() && ptr == s.data() + s.size()) return Value::Int(out);
      }
      return arg(0, "default").is_undefined() ? Value::Int(0) : arg(0, "default");
    }
    if (name == "float") {
      if (v.is_number()) return Value::Float(v.float_value());
      if (v.is_string()) {
        char* end = nullptr;
        const double d = std::strtod(v.str().c_str(), &end);
        if (end != v.str().c_str() && *end == '\0') return Value::Float(d);
      }
      return Value::Float(0.0);
    }
    if (name == "abs") {
      if (v.kind() == K::kFloat) return Value::Float(std::fabs(v.float_value()));
      if (v.is_number()) {
        if (v.int_value() == std::numeric_limits<int64_t>::min()) return Error(p, "integer overflow");
        return Value::Int(v.int_value() < 0 ? -v.int_value() : v.int_value());
      }
      return Error(p, "abs: expected a number");
    }
    if (name == "unique") {
      KVR_ASSIGN_OR_RETURN(List items, Iterate(p, v));
      List out;
      for (const Value& x : items) {
        bool seen = false;
        for (const Value& y : out) seen = seen || Equal(x, y);
        if (!seen) out.push_back(x);
      }
      return Value::MakeList(std::move(out));
    }
    if (name == "sort") {
      KVR_ASSIGN_OR_RETURN(List items, Iterate(p, v));
      const bool rev = arg(0, "reverse").Truthy();
      const Value& attr = arg(2, "attribute");
      auto key = [&](const Value& x) -> Value {
        if (attr.is_string() && x.is_mapping()) {
          const Value* f = x.dict().Find(attr.str());
          return f != nullptr ? *f : Value();
        }
        return x;
      };
      // Keys must be all numbers or all strings, checked before sorting, so
      // the comparison is a strict weak order (NaN aside: refused too).
      bool numbers = true, strings = true;
      for (const Value& x : items) {
        const Value k = key(x);
        numbers = numbers && k.is_number() && !std::isnan(k.float_value());
        strings = strings && k.is_string();
      }
      if (!numbers && !strings && !items.empty()) {
        return Error(p, "sort: items must be all numbers or all strings");
      }
      std::stable_sort(items.begin(), items.end(), [&](const Value& x, const Value& y) {
        absl::StatusOr<bool> lt = Compare(p, "<", rev ? key(y) : key(x), rev ? key(x) : key(y));
        return lt.ok() && *lt;
      });
      return Value::MakeList(std::move(items));
    }
    if (name == "select" || name == "reject" || name == "selectattr" || name == "rejectattr") {
      const bool attr_mode = name == "selectattr" || name == "rejectattr";
      const bool keep_true = name == "select" || name == "selectattr";
      KVR_ASSIGN_OR_RETURN(List items, Iterate(p, v));
      size_t at = 1;
      Value attr;
      if (attr_mode) {
        if (a.args.size() < 2 || !a.args[1].is_string()) return Error(p, absl::StrCat(name, ": expected an attribute name"));
        attr = a.args[1];
        at = 2;
      }
      List out;
      for (const Value& x : items) {
        Value subject = x;
        if (attr_mode) {
          subject = x.is_mapping() && x.dict().Find(attr.str()) != nullptr ? *x.dict().Find(attr.str()) : Value();
        }
        bool ok = subject.Truthy();
        if (at < a.args.size()) {
          if (!a.args[at].is_string()) return Error(p, absl::StrCat(name, ": expected a test name"));
          CallArgs ta;
          ta.args.push_back(subject);
          for (size_t i = at + 1; i < a.args.size(); ++i) ta.args.push_back(a.args[i]);
          KVR_ASSIGN_OR_RETURN(ok, ApplyTest(p, a.args[at].str(), subject, ta));
        }
        if (ok == keep_true) out.push_back(x);
      }
      return Value::MakeList(std::move(out));
    }
    if (name == "map") {
      KVR_ASSIGN_OR_RETURN(List items, Iterate(p, v));
      const Value& attr = a.Get(99, "attribute");
      List out;
      for (const Value& x : items) {
        if (attr.is_string()) {
          const Value* f = x.is_mapping() ? x.dict().Find(attr.str()) : nullptr;
          out.push_back(f != nullptr ? *f : a.Get(99, "default"));
        } else {
          if (a.args.size() < 2 || !a.args[1].is_string()) return Error(p, "map: expected a filter name or attribute=");
          CallArgs fa;
          fa.args.push_back(x);
          for (size_t i = 2; i < a.args.size(); ++i) fa.args.push_back(a.args[i]);
          KVR_ASSIGN_OR_RETURN(Value y, ApplyFilter(p, a.args[1].str(), x, fa));
          out.push_back(std::move(y));
        }
      }
      return Value::MakeList(std::move(out));
    }
    if (name == "safe" || name == "e" || name == "escape") {
      if (name == "safe") return v;
    }
    return Error(p, absl::StrCat("no filter named '", name, "'"));
  }

  const Limits& limits_;
  const Value& globals_;
  std::vector<std::shared_ptr<Scope>> scopes_;
  int64_t iterations_ = 0;
  int call_depth_ = 0;
};

}  // namespace

// ---------------------------------------------------------------- Template

Template::Template() = default;
Template::Template(Template&&) noexcept = default;
Template& Template::operator=(Template&&) noexcept = default;
Template::~Template() = default;

absl::StatusOr<Template> Template::Parse(absl::string_view source, const Limits& limits) {
  if (source.size() > limits.max_template_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("template: ", source.size(),
                                                   " bytes exceeds max_template_bytes ",
                                                   limits.max_template_bytes));
  }
  // Jinja2: \r\n and \r are newlines; one trailing newline is dropped
  // (keep_trailing_newline=False).
  std::string src;
  src.reserve(source.size());
  for (size_t i = 0; i < source.size(); ++i) {
    if (source[i] == '\r') {
      src += '\n';
      if (i + 1 < source.size() && source[i + 1] == '\n') ++i;
    } else {
      src += source[i];
    }
  }
  if (!src.empty() && src.back() == '\n') src.pop_back();
  Lexer lexer(std::move(src));
  KVR_ASSIGN_OR_RETURN(std::vector<Piece> pieces, lexer.Run());
  Parser parser(std::move(pieces), limits);
  KVR_ASSIGN_OR_RETURN(NodePtr root, parser.ParseTemplate());
  Template t;
  t.root_ = std::move(root);
  t.limits_ = limits;
  return t;
}

absl::StatusOr<std::string> Template::Render(const Value& variables) const {
  Renderer r(limits_, variables);
  std::string out;
  KVR_RETURN_IF_ERROR(r.Run(*root_, &out));
  return out;
}

}  // namespace kvr::jinja
