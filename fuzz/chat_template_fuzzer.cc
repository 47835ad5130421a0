// Fuzzes chat templates: the Jinja subset (services/gateway/jinja.h) parses
// the input as a template under tight limits and renders it over a fixed
// conversation with the chat globals (raise_exception, strftime_now), and
// the worker's tokenizer_config.json / generation_config.json readers
// (gpu_worker/model/chat_config.h) parse the same bytes. Any input gives a
// status; a render that succeeds stays within max_output_bytes.
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>

#include "gpu_worker/model/chat_config.h"
#include "nlohmann/json.hpp"
#include "services/gateway/chat_template.h"
#include "services/gateway/jinja.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  (void)kvr::worker::ParseTokenizerConfig(text, "fuzz");
  (void)kvr::worker::ParseGenerationConfigEos(text, "fuzz");

  kvr::jinja::Limits limits;
  limits.max_loop_iterations = 2000;
  limits.max_output_bytes = 64 * 1024;
  limits.max_depth = 48;
  absl::StatusOr<kvr::gateway::ChatTemplate> t =
      kvr::gateway::ChatTemplate::Create(text, "<s>", "</s>", limits);
  if (!t.ok()) return 0;
  static const nlohmann::json kMessages = nlohmann::json::parse(R"([
    {"role": "system", "content": " Be brief. "},
    {"role": "user", "content": "Hi {{ there }} é"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": ""}])");
  for (const bool gen : {false, true}) {
    absl::StatusOr<std::string> out = t->Render(kMessages, gen);
    if (out.ok() && out->size() > limits.max_output_bytes) std::abort();
  }
  return 0;
}
