#include "retrieval_node/wire/ucx_wire.h"

#include <arpa/inet.h>
#include <netinet/in.h>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace kvr::retrieval {

absl::Status ParseUcxAddress(const std::string& address, std::string* host, uint16_t* port,
                             const char* field) {
  const size_t colon = address.rfind(':');
  uint32_t p = 0;
  in_addr a{};
  if (colon == std::string::npos || !absl::SimpleAtoi(address.substr(colon + 1), &p) ||
      p > 65535 || inet_pton(AF_INET, address.substr(0, colon).c_str(), &a) != 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, " \"", address, "\" is not IPV4:PORT (e.g. 127.0.0.1:0)"));
  }
  *host = address.substr(0, colon);
  *port = static_cast<uint16_t>(p);
  return absl::OkStatus();
}

}  // namespace kvr::retrieval
