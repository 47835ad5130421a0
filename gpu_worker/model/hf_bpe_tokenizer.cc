#include "gpu_worker/model/hf_bpe_tokenizer.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <queue>
#include <span>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "gpu_worker/model/model_files.h"
#ifdef KVR_HAVE_NLOHMANN_JSON
#include "nlohmann/json.hpp"
#endif

namespace kvr::worker {
namespace {

#ifdef KVR_HAVE_NLOHMANN_JSON
using Json = nlohmann::json;
#endif

constexpr std::string_view kLlama3Pattern =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

// ---------------------------------------------------------------------------
// Unicode classes
// ---------------------------------------------------------------------------
struct CodeRange {
  uint32_t lo, hi;
};

// General categories L* and N* as inclusive code point ranges, generated from
// Python's unicodedata (Unicode 14.0.0) with:
//   def ranges(pred):  # maximal runs of code points c with pred(c)
//     ...
//   ranges(lambda c: unicodedata.category(chr(c)).startswith('L'))   # and 'N'
// clang-format off
constexpr CodeRange kLetterRanges[] = {
    {0x41, 0x5A}, {0x61, 0x7A}, {0xAA, 0xAA}, {0xB5, 0xB5}, {0xBA, 0xBA}, {0xC0, 0xD6},
    {0xD8, 0xF6}, {0xF8, 0x2C1}, {0x2C6, 0x2D1}, {0x2E0, 0x2E4}, {0x2EC, 0x2EC}, {0x2EE, 0x2EE},
    {0x370, 0x374}, {0x376, 0x377}, {0x37A, 0x37D}, {0x37F, 0x37F}, {0x386, 0x386},
    {0x388, 0x38A}, {0x38C, 0x38C}, {0x38E, 0x3A1}, {0x3A3, 0x3F5}, {0x3F7, 0x481},
    {0x48A, 0x52F}, {0x531, 0x556}, {0x559, 0x559}, {0x560, 0x588}, {0x5D0, 0x5EA},
    {0x5EF, 0x5F2}, {0x620, 0x64A}, {0x66E, 0x66F}, {0x671, 0x6D3}, {0x6D5, 0x6D5},
    {0x6E5, 0x6E6}, {0x6EE, 0x6EF}, {0x6FA, 0x6FC}, {0x6FF, 0x6FF}, {0x710, 0x710},
    {0x712, 0x72F}, {0x74D, 0x7A5}, {0x7B1, 0x7B1}, {0x7CA, 0x7EA}, {0x7F4, 0x7F5},
    {0x7FA, 0x7FA}, {0x800, 0x815}, {0x81A, 0x81A}, {0x824, 0x824}, {0x828, 0x828},
    {0x840, 0x858}, {0x860, 0x86A}, {0x870, 0x887}, {0x889, 0x88E}, {0x8A0, 0x8C9},
    {0x904, 0x939}, {0x93D, 0x93D}, {0x950, 0x950}, {0x958, 0x961}, {0x971, 0x980},
    {0x985, 0x98C}, {0x98F, 0x990}, {0x993, 0x9A8}, {0x9AA, 0x9B0}, {0x9B2, 0x9B2},
    {0x9B6, 0x9B9}, {0x9BD, 0x9BD}, {0x9CE, 0x9CE}, {0x9DC, 0x9DD}, {0x9DF, 0x9E1},
    {0x9F0, 0x9F1}, {0x9FC, 0x9FC}, {0xA05, 0xA0A}, {0xA0F, 0xA10}, {0xA13, 0xA28},
    {0xA2A, 0xA30}, {0xA32, 0xA33}, {0xA35, 0xA36}, {0xA38, 0xA39}, {0xA59, 0xA5C},
    {0xA5E, 0xA5E}, {0xA72, 0xA74}, {0xA85, 0xA8D}, {0xA8F, 0xA91}, {0xA93, 0xAA8},
    {0xAAA, 0xAB0}, {0xAB2, 0xAB3}, {0xAB5, 0xAB9}, {0xABD, 0xABD}, {0xAD0, 0xAD0},
    {0xAE0, 0xAE1}, {0xAF9, 0xAF9}, {0xB05, 0xB0C}, {0xB0F, 0xB10}, {0xB13, 0xB28},
    {0xB2A, 0xB30}, {0xB32, 0xB33}, {0xB35, 0xB39}, {0xB3D, 0xB3D}, {0xB5C, 0xB5D},
    {0xB5F, 0xB61}, {0xB71, 0xB71}, {0xB83, 0xB83}, {0xB85, 0xB8A}, {0xB8E, 0xB90},
    {0xB92, 0xB95}, {0xB99, 0xB9A}, {0xB9C, 0xB9C}, {0xB9E, 0xB9F}, {0xBA3, 0xBA4},
    {0xBA8, 0xBAA}, {0xBAE, 0xBB9}, {0xBD0, 0xBD0}, {0xC05, 0xC0C}, {0xC0E, 0xC10},
    {0xC12, 0xC28}, {0xC2A, 0xC39}, {0xC3D, 0xC3D}, {0xC58, 0xC5A}, {0xC5D, 0xC5D},
    {0xC60, 0xC61}, {0xC80, 0xC80}, {0xC85, 0xC8C}, {0xC8E, 0xC90}, {0xC92, 0xCA8},
    {0xCAA, 0xCB3}, {0xCB5, 0xCB9}, {0xCBD, 0xCBD}, {0xCDD, 0xCDE}, {0xCE0, 0xCE1},
    {0xCF1, 0xCF2}, {0xD04, 0xD0C}, {0xD0E, 0xD10}, {0xD12, 0xD3A}, {0xD3D, 0xD3D},
    {0xD4E, 0xD4E}, {0xD54, 0xD56}, {0xD5F, 0xD61}, {0xD7A, 0xD7F}, {0xD85, 0xD96},
    {0xD9A, 0xDB1}, {0xDB3, 0xDBB}, {0xDBD, 0xDBD}, {0xDC0, 0xDC6}, {0xE01, 0xE30},
    {0xE32, 0xE33}, {0xE40, 0xE46}, {0xE81, 0xE82}, {0xE84, 0xE84}, {0xE86, 0xE8A},
    {0xE8C, 0xEA3}, {0xEA5, 0xEA5}, {0xEA7, 0xEB0}, {0xEB2, 0xEB3}, {0xEBD, 0xEBD},
    {0xEC0, 0xEC4}, {0xEC6, 0xEC6}, {0xEDC, 0xEDF}, {0xF00, 0xF00}, {0xF40, 0xF47},
    {0xF49, 0xF6C}, {0xF88, 0xF8C}, {0x1000, 0x102A}, {0x103F, 0x103F}, {0x1050, 0x1055},
    {0x105A, 0x105D}, {0x1061, 0x1061}, {0x1065, 0x1066}, {0x106E, 0x1070}, {0x1075, 0x1081},
    {0x108E, 0x108E}, {0x10A0, 0x10C5}, {0x10C7, 0x10C7}, {0x10CD, 0x10CD}, {0x10D0, 0x10FA},
    {0x10FC, 0x1248}, {0x124A, 0x124D}, {0x1250, 0x1256}, {0x1258, 0x1258}, {0x125A, 0x125D},
    {0x1260, 0x1288}, {0x128A, 0x128D}, {0x1290, 0x12B0}, {0x12B2, 0x12B5}, {0x12B8, 0x12BE},
    {0x12C0, 0x12C0}, {0x12C2, 0x12C5}, {0x12C8, 0x12D6}, {0x12D8, 0x1310}, {0x1312, 0x1315},
    {0x1318, 0x135A}, {0x1380, 0x138F}, {0x13A0, 0x13F5}, {0x13F8, 0x13FD}, {0x1401, 0x166C},
    {0x166F, 0x167F}, {0x1681, 0x169A}, {0x16A0, 0x16EA}, {0x16F1, 0x16F8}, {0x1700, 0x1711},
    {0x171F, 0x1731}, {0x1740, 0x1751}, {0x1760, 0x176C}, {0x176E, 0x1770}, {0x1780, 0x17B3},
    {0x17D7, 0x17D7}, {0x17DC, 0x17DC}, {0x1820, 0x1878}, {0x1880, 0x1884}, {0x1887, 0x18A8},
    {0x18AA, 0x18AA}, {0x18B0, 0x18F5}, {0x1900, 0x191E}, {0x1950, 0x196D}, {0x1970, 0x1974},
    {0x1980, 0x19AB}, {0x19B0, 0x19C9}, {0x1A00, 0x1A16}, {0x1A20, 0x1A54}, {0x1AA7, 0x1AA7},
    {0x1B05, 0x1B33}, {0x1B45, 0x1B4C}, {0x1B83, 0x1BA0}, {0x1BAE, 0x1BAF}, {0x1BBA, 0x1BE5},
    {0x1C00, 0x1C23}, {0x1C4D, 0x1C4F}, {0x1C5A, 0x1C7D}, {0x1C80, 0x1C88}, {0x1C90, 0x1CBA},
    {0x1CBD, 0x1CBF}, {0x1CE9, 0x1CEC}, {0x1CEE, 0x1CF3}, {0x1CF5, 0x1CF6}, {0x1CFA, 0x1CFA},
    {0x1D00, 0x1DBF}, {0x1E00, 0x1F15}, {0x1F18, 0x1F1D}, {0x1F20, 0x1F45}, {0x1F48, 0x1F4D},
    {0x1F50, 0x1F57}, {0x1F59, 0x1F59}, {0x1F5B, 0x1F5B}, {0x1F5D, 0x1F5D}, {0x1F5F, 0x1F7D},
    {0x1F80, 0x1FB4}, {0x1FB6, 0x1FBC}, {0x1FBE, 0x1FBE}, {0x1FC2, 0x1FC4}, {0x1FC6, 0x1FCC},
    {0x1FD0, 0x1FD3}, {0x1FD6, 0x1FDB}, {0x1FE0, 0x1FEC}, {0x1FF2, 0x1FF4}, {0x1FF6, 0x1FFC},
    {0x2071, 0x2071}, {0x207F, 0x207F}, {0x2090, 0x209C}, {0x2102, 0x2102}, {0x2107, 0x2107},
    {0x210A, 0x2113}, {0x2115, 0x2115}, {0x2119, 0x211D}, {0x2124, 0x2124}, {0x2126, 0x2126},
    {0x2128, 0x2128}, {0x212A, 0x212D}, {0x212F, 0x2139}, {0x213C, 0x213F}, {0x2145, 0x2149},
    {0x214E, 0x214E}, {0x2183, 0x2184}, {0x2C00, 0x2CE4}, {0x2CEB, 0x2CEE}, {0x2CF2, 0x2CF3},
    {0x2D00, 0x2D25}, {0x2D27, 0x2D27}, {0x2D2D, 0x2D2D}, {0x2D30, 0x2D67}, {0x2D6F, 0x2D6F},
    {0x2D80, 0x2D96}, {0x2DA0, 0x2DA6}, {0x2DA8, 0x2DAE}, {0x2DB0, 0x2DB6}, {0x2DB8, 0x2DBE},
    {0x2DC0, 0x2DC6}, {0x2DC8, 0x2DCE}, {0x2DD0, 0x2DD6}, {0x2DD8, 0x2DDE}, {0x2E2F, 0x2E2F},
    {0x3005, 0x3006}, {0x3031, 0x3035}, {0x303B, 0x303C}, {0x3041, 0x3096}, {0x309D, 0x309F},
    {0x30A1, 0x30FA}, {0x30FC, 0x30FF}, {0x3105, 0x312F}, {0x3131, 0x318E}, {0x31A0, 0x31BF},
    {0x31F0, 0x31FF}, {0x3400, 0x4DBF}, {0x4E00, 0xA48C}, {0xA4D0, 0xA4FD}, {0xA500, 0xA60C},
    {0xA610, 0xA61F}, {0xA62A, 0xA62B}, {0xA640, 0xA66E}, {0xA67F, 0xA69D}, {0xA6A0, 0xA6E5},
    {0xA717, 0xA71F}, {0xA722, 0xA788}, {0xA78B, 0xA7CA}, {0xA7D0, 0xA7D1}, {0xA7D3, 0xA7D3},
    {0xA7D5, 0xA7D9}, {0xA7F2, 0xA801}, {0xA803, 0xA805}, {0xA807, 0xA80A}, {0xA80C, 0xA822},
    {0xA840, 0xA873}, {0xA882, 0xA8B3}, {0xA8F2, 0xA8F7}, {0xA8FB, 0xA8FB}, {0xA8FD, 0xA8FE},
    {0xA90A, 0xA925}, {0xA930, 0xA946}, {0xA960, 0xA97C}, {0xA984, 0xA9B2}, {0xA9CF, 0xA9CF},
    {0xA9E0, 0xA9E4}, {0xA9E6, 0xA9EF}, {0xA9FA, 0xA9FE}, {0xAA00, 0xAA28}, {0xAA40, 0xAA42},
    {0xAA44, 0xAA4B}, {0xAA60, 0xAA76}, {0xAA7A, 0xAA7A}, {0xAA7E, 0xAAAF}, {0xAAB1, 0xAAB1},
    {0xAAB5, 0xAAB6}, {0xAAB9, 0xAABD}, {0xAAC0, 0xAAC0}, {0xAAC2, 0xAAC2}, {0xAADB, 0xAADD},
    {0xAAE0, 0xAAEA}, {0xAAF2, 0xAAF4}, {0xAB01, 0xAB06}, {0xAB09, 0xAB0E}, {0xAB11, 0xAB16},
    {0xAB20, 0xAB26}, {0xAB28, 0xAB2E}, {0xAB30, 0xAB5A}, {0xAB5C, 0xAB69}, {0xAB70, 0xABE2},
    {0xAC00, 0xD7A3}, {0xD7B0, 0xD7C6}, {0xD7CB, 0xD7FB}, {0xF900, 0xFA6D}, {0xFA70, 0xFAD9},
    {0xFB00, 0xFB06}, {0xFB13, 0xFB17}, {0xFB1D, 0xFB1D}, {0xFB1F, 0xFB28}, {0xFB2A, 0xFB36},
    {0xFB38, 0xFB3C}, {0xFB3E, 0xFB3E}, {0xFB40, 0xFB41}, {0xFB43, 0xFB44}, {0xFB46, 0xFBB1},
    {0xFBD3, 0xFD3D}, {0xFD50, 0xFD8F}, {0xFD92, 0xFDC7}, {0xFDF0, 0xFDFB}, {0xFE70, 0xFE74},
    {0xFE76, 0xFEFC}, {0xFF21, 0xFF3A}, {0xFF41, 0xFF5A}, {0xFF66, 0xFFBE}, {0xFFC2, 0xFFC7},
    {0xFFCA, 0xFFCF}, {0xFFD2, 0xFFD7}, {0xFFDA, 0xFFDC}, {0x10000, 0x1000B}, {0x1000D, 0x10026},
    {0x10028, 0x1003A}, {0x1003C, 0x1003D}, {0x1003F, 0x1004D}, {0x10050, 0x1005D},
    {0x10080, 0x100FA}, {0x10280, 0x1029C}, {0x102A0, 0x102D0}, {0x10300, 0x1031F},
    {0x1032D, 0x10340}, {0x10342, 0x10349}, {0x10350, 0x10375}, {0x10380, 0x1039D},
    {0x103A0, 0x103C3}, {0x103C8, 0x103CF}, {0x10400, 0x1049D}, {0x104B0, 0x104D3},
    {0x104D8, 0x104FB}, {0x10500, 0x10527}, {0x10530, 0x10563}, {0x10570, 0x1057A},
    {0x1057C, 0x1058A}, {0x1058C, 0x10592}, {0x10594, 0x10595}, {0x10597, 0x105A1},
    {0x105A3, 0x105B1}, {0x105B3, 0x105B9}, {0x105BB, 0x105BC}, {0x10600, 0x10736},
    {0x10740, 0x10755}, {0x10760, 0x10767}, {0x10780, 0x10785}, {0x10787, 0x107B0},
    {0x107B2, 0x107BA}, {0x10800, 0x10805}, {0x10808, 0x10808}, {0x1080A, 0x10835},
    {0x10837, 0x10838}, {0x1083C, 0x1083C}, {0x1083F, 0x10855}, {0x10860, 0x10876},
    {0x10880, 0x1089E}, {0x108E0, 0x108F2}, {0x108F4, 0x108F5}, {0x10900, 0x10915},
    {0x10920, 0x10939}, {0x10980, 0x109B7}, {0x109BE, 0x109BF}, {0x10A00, 0x10A00},
    {0x10A10, 0x10A13}, {0x10A15, 0x10A17}, {0x10A19, 0x10A35}, {0x10A60, 0x10A7C},
    {0x10A80, 0x10A9C}, {0x10AC0, 0x10AC7}, {0x10AC9, 0x10AE4}, {0x10B00, 0x10B35},
    {0x10B40, 0x10B55}, {0x10B60, 0x10B72}, {0x10B80, 0x10B91}, {0x10C00, 0x10C48},
    {0x10C80, 0x10CB2}, {0x10CC0, 0x10CF2}, {0x10D00, 0x10D23}, {0x10E80, 0x10EA9},
    {0x10EB0, 0x10EB1}, {0x10F00, 0x10F1C}, {0x10F27, 0x10F27}, {0x10F30, 0x10F45},
    {0x10F70, 0x10F81}, {0x10FB0, 0x10FC4}, {0x10FE0, 0x10FF6}, {0x11003, 0x11037},
    {0x11071, 0x11072}, {0x11075, 0x11075}, {0x11083, 0x110AF}, {0x110D0, 0x110E8},
    {0x11103, 0x11126}, {0x11144, 0x11144}, {0x11147, 0x11147}, {0x11150, 0x11172},
    {0x11176, 0x11176}, {0x11183, 0x111B2}, {0x111C1, 0x111C4}, {0x111DA, 0x111DA},
    {0x111DC, 0x111DC}, {0x11200, 0x11211}, {0x11213, 0x1122B}, {0x11280, 0x11286},
    {0x11288, 0x11288}, {0x1128A, 0x1128D}, {0x1128F, 0x1129D}, {0x1129F, 0x112A8},
    {0x112B0, 0x112DE}, {0x11305, 0x1130C}, {0x1130F, 0x11310}, {0x11313, 0x11328},
    {0x1132A, 0x11330}, {0x11332, 0x11333}, {0x11335, 0x11339}, {0x1133D, 0x1133D},
    {0x11350, 0x11350}, {0x1135D, 0x11361}, {0x11400, 0x11434}, {0x11447, 0x1144A},
    {0x1145F, 0x11461}, {0x11480, 0x114AF}, {0x114C4, 0x114C5}, {0x114C7, 0x114C7},
    {0x11580, 0x115AE}, {0x115D8, 0x115DB}, {0x11600, 0x1162F}, {0x11644, 0x11644},
    {0x11680, 0x116AA}, {0x116B8, 0x116B8}, {0x11700, 0x1171A}, {0x11740, 0x11746},
    {0x11800, 0x1182B}, {0x118A0, 0x118DF}, {0x118FF, 0x11906}, {0x11909, 0x11909},
    {0x1190C, 0x11913}, {0x11915, 0x11916}, {0x11918, 0x1192F}, {0x1193F, 0x1193F},
    {0x11941, 0x11941}, {0x119A0, 0x119A7}, {0x119AA, 0x119D0}, {0x119E1, 0x119E1},
    {0x119E3, 0x119E3}, {0x11A00, 0x11A00}, {0x11A0B, 0x11A32}, {0x11A3A, 0x11A3A},
    {0x11A50, 0x11A50}, {0x11A5C, 0x11A89}, {0x11A9D, 0x11A9D}, {0x11AB0, 0x11AF8},
    {0x11C00, 0x11C08}, {0x11C0A, 0x11C2E}, {0x11C40, 0x11C40}, {0x11C72, 0x11C8F},
    {0x11D00, 0x11D06}, {0x11D08, 0x11D09}, {0x11D0B, 0x11D30}, {0x11D46, 0x11D46},
    {0x11D60, 0x11D65}, {0x11D67, 0x11D68}, {0x11D6A, 0x11D89}, {0x11D98, 0x11D98},
    {0x11EE0, 0x11EF2}, {0x11FB0, 0x11FB0}, {0x12000, 0x12399}, {0x12480, 0x12543},
    {0x12F90, 0x12FF0}, {0x13000, 0x1342E}, {0x14400, 0x14646}, {0x16800, 0x16A38},
    {0x16A40, 0x16A5E}, {0x16A70, 0x16ABE}, {0x16AD0, 0x16AED}, {0x16B00, 0x16B2F},
    {0x16B40, 0x16B43}, {0x16B63, 0x16B77}, {0x16B7D, 0x16B8F}, {0x16E40, 0x16E7F},
    {0x16F00, 0x16F4A}, {0x16F50, 0x16F50}, {0x16F93, 0x16F9F}, {0x16FE0, 0x16FE1},
    {0x16FE3, 0x16FE3}, {0x17000, 0x187F7}, {0x18800, 0x18CD5}, {0x18D00, 0x18D08},
    {0x1AFF0, 0x1AFF3}, {0x1AFF5, 0x1AFFB}, {0x1AFFD, 0x1AFFE}, {0x1B000, 0x1B122},
    {0x1B150, 0x1B152}, {0x1B164, 0x1B167}, {0x1B170, 0x1B2FB}, {0x1BC00, 0x1BC6A},
    {0x1BC70, 0x1BC7C}, {0x1BC80, 0x1BC88}, {0x1BC90, 0x1BC99}, {0x1D400, 0x1D454},
    {0x1D456, 0x1D49C}, {0x1D49E, 0x1D49F}, {0x1D4A2, 0x1D4A2}, {0x1D4A5, 0x1D4A6},
    {0x1D4A9, 0x1D4AC}, {0x1D4AE, 0x1D4B9}, {0x1D4BB, 0x1D4BB}, {0x1D4BD, 0x1D4C3},
    {0x1D4C5, 0x1D505}, {0x1D507, 0x1D50A}, {0x1D50D, 0x1D514}, {0x1D516, 0x1D51C},
    {0x1D51E, 0x1D539}, {0x1D53B, 0x1D53E}, {0x1D540, 0x1D544}, {0x1D546, 0x1D546},
    {0x1D54A, 0x1D550}, {0x1D552, 0x1D6A5}, {0x1D6A8, 0x1D6C0}, {0x1D6C2, 0x1D6DA},
    {0x1D6DC, 0x1D6FA}, {0x1D6FC, 0x1D714}, {0x1D716, 0x1D734}, {0x1D736, 0x1D74E},
    {0x1D750, 0x1D76E}, {0x1D770, 0x1D788}, {0x1D78A, 0x1D7A8}, {0x1D7AA, 0x1D7C2},
    {0x1D7C4, 0x1D7CB}, {0x1DF00, 0x1DF1E}, {0x1E100, 0x1E12C}, {0x1E137, 0x1E13D},
    {0x1E14E, 0x1E14E}, {0x1E290, 0x1E2AD}, {0x1E2C0, 0x1E2EB}, {0x1E7E0, 0x1E7E6},
    {0x1E7E8, 0x1E7EB}, {0x1E7ED, 0x1E7EE}, {0x1E7F0, 0x1E7FE}, {0x1E800, 0x1E8C4},
    {0x1E900, 0x1E943}, {0x1E94B, 0x1E94B}, {0x1EE00, 0x1EE03}, {0x1EE05, 0x1EE1F},
    {0x1EE21, 0x1EE22}, {0x1EE24, 0x1EE24}, {0x1EE27, 0x1EE27}, {0x1EE29, 0x1EE32},
    {0x1EE34, 0x1EE37}, {0x1EE39, 0x1EE39}, {0x1EE3B, 0x1EE3B}, {0x1EE42, 0x1EE42},
    {0x1EE47, 0x1EE47}, {0x1EE49, 0x1EE49}, {0x1EE4B, 0x1EE4B}, {0x1EE4D, 0x1EE4F},
    {0x1EE51, 0x1EE52}, {0x1EE54, 0x1EE54}, {0x1EE57, 0x1EE57}, {0x1EE59, 0x1EE59},
    {0x1EE5B, 0x1EE5B}, {0x1EE5D, 0x1EE5D}, {0x1EE5F, 0x1EE5F}, {0x1EE61, 0x1EE62},
    {0x1EE64, 0x1EE64}, {0x1EE67, 0x1EE6A}, {0x1EE6C, 0x1EE72}, {0x1EE74, 0x1EE77},
    {0x1EE79, 0x1EE7C}, {0x1EE7E, 0x1EE7E}, {0x1EE80, 0x1EE89}, {0x1EE8B, 0x1EE9B},
    {0x1EEA1, 0x1EEA3}, {0x1EEA5, 0x1EEA9}, {0x1EEAB, 0x1EEBB}, {0x20000, 0x2A6DF},
    {0x2A700, 0x2B738}, {0x2B740, 0x2B81D}, {0x2B820, 0x2CEA1}, {0x2CEB0, 0x2EBE0},
    {0x2F800, 0x2FA1D}, {0x30000, 0x3134A},
};

constexpr CodeRange kNumberRanges[] = {
    {0x30, 0x39}, {0xB2, 0xB3}, {0xB9, 0xB9}, {0xBC, 0xBE}, {0x660, 0x669}, {0x6F0, 0x6F9},
    {0x7C0, 0x7C9}, {0x966, 0x96F}, {0x9E6, 0x9EF}, {0x9F4, 0x9F9}, {0xA66, 0xA6F},
    {0xAE6, 0xAEF}, {0xB66, 0xB6F}, {0xB72, 0xB77}, {0xBE6, 0xBF2}, {0xC66, 0xC6F},
    {0xC78, 0xC7E}, {0xCE6, 0xCEF}, {0xD58, 0xD5E}, {0xD66, 0xD78}, {0xDE6, 0xDEF},
    {0xE50, 0xE59}, {0xED0, 0xED9}, {0xF20, 0xF33}, {0x1040, 0x1049}, {0x1090, 0x1099},
    {0x1369, 0x137C}, {0x16EE, 0x16F0}, {0x17E0, 0x17E9}, {0x17F0, 0x17F9}, {0x1810, 0x1819},
    {0x1946, 0x194F}, {0x19D0, 0x19DA}, {0x1A80, 0x1A89}, {0x1A90, 0x1A99}, {0x1B50, 0x1B59},
    {0x1BB0, 0x1BB9}, {0x1C40, 0x1C49}, {0x1C50, 0x1C59}, {0x2070, 0x2070}, {0x2074, 0x2079},
    {0x2080, 0x2089}, {0x2150, 0x2182}, {0x2185, 0x2189}, {0x2460, 0x249B}, {0x24EA, 0x24FF},
    {0x2776, 0x2793}, {0x2CFD, 0x2CFD}, {0x3007, 0x3007}, {0x3021, 0x3029}, {0x3038, 0x303A},
    {0x3192, 0x3195}, {0x3220, 0x3229}, {0x3248, 0x324F}, {0x3251, 0x325F}, {0x3280, 0x3289},
    {0x32B1, 0x32BF}, {0xA620, 0xA629}, {0xA6E6, 0xA6EF}, {0xA830, 0xA835}, {0xA8D0, 0xA8D9},
    {0xA900, 0xA909}, {0xA9D0, 0xA9D9}, {0xA9F0, 0xA9F9}, {0xAA50, 0xAA59}, {0xABF0, 0xABF9},
    {0xFF10, 0xFF19}, {0x10107, 0x10133}, {0x10140, 0x10178}, {0x1018A, 0x1018B},
    {0x102E1, 0x102FB}, {0x10320, 0x10323}, {0x10341, 0x10341}, {0x1034A, 0x1034A},
    {0x103D1, 0x103D5}, {0x104A0, 0x104A9}, {0x10858, 0x1085F}, {0x10879, 0x1087F},
    {0x108A7, 0x108AF}, {0x108FB, 0x108FF}, {0x10916, 0x1091B}, {0x109BC, 0x109BD},
    {0x109C0, 0x109CF}, {0x109D2, 0x109FF}, {0x10A40, 0x10A48}, {0x10A7D, 0x10A7E},
    {0x10A9D, 0x10A9F}, {0x10AEB, 0x10AEF}, {0x10B58, 0x10B5F}, {0x10B78, 0x10B7F},
    {0x10BA9, 0x10BAF}, {0x10CFA, 0x10CFF}, {0x10D30, 0x10D39}, {0x10E60, 0x10E7E},
    {0x10F1D, 0x10F26}, {0x10F51, 0x10F54}, {0x10FC5, 0x10FCB}, {0x11052, 0x1106F},
    {0x110F0, 0x110F9}, {0x11136, 0x1113F}, {0x111D0, 0x111D9}, {0x111E1, 0x111F4},
    {0x112F0, 0x112F9}, {0x11450, 0x11459}, {0x114D0, 0x114D9}, {0x11650, 0x11659},
    {0x116C0, 0x116C9}, {0x11730, 0x1173B}, {0x118E0, 0x118F2}, {0x11950, 0x11959},
    {0x11C50, 0x11C6C}, {0x11D50, 0x11D59}, {0x11DA0, 0x11DA9}, {0x11FC0, 0x11FD4},
    {0x12400, 0x1246E}, {0x16A60, 0x16A69}, {0x16AC0, 0x16AC9}, {0x16B50, 0x16B59},
    {0x16B5B, 0x16B61}, {0x16E80, 0x16E96}, {0x1D2E0, 0x1D2F3}, {0x1D360, 0x1D378},
    {0x1D7CE, 0x1D7FF}, {0x1E140, 0x1E149}, {0x1E2F0, 0x1E2F9}, {0x1E8C7, 0x1E8CF},
    {0x1E950, 0x1E959}, {0x1EC71, 0x1ECAB}, {0x1ECAD, 0x1ECAF}, {0x1ECB1, 0x1ECB4},
    {0x1ED01, 0x1ED2D}, {0x1ED2F, 0x1ED3D}, {0x1F100, 0x1F10C}, {0x1FBF0, 0x1FBF9},
};

// clang-format on

bool InRanges(std::span<const CodeRange> r, uint32_t c) {
  auto it = std::upper_bound(r.begin(), r.end(), c,
                             [](uint32_t v, const CodeRange& x) { return v < x.lo; });
  return it != r.begin() && c <= std::prev(it)->hi;
}

bool IsLetter(uint32_t c) {
  if (c < 0x80) return (c | 0x20) >= 'a' && (c | 0x20) <= 'z';
  return InRanges(kLetterRanges, c);
}
bool IsNumber(uint32_t c) {
  if (c < 0x80) return c >= '0' && c <= '9';
  return InRanges(kNumberRanges, c);
}
// Unicode White_Space.
bool IsSpace(uint32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}
bool IsCrLf(uint32_t c) { return c == '\r' || c == '\n'; }
bool IsOther(uint32_t c) { return !IsSpace(c) && !IsLetter(c) && !IsNumber(c); }

// Code points of `text` with their byte offsets (offsets has one extra entry,
// text.size()). An invalid byte is one code point 0xFFFFFFFF ("other").
void DecodeUtf8(std::string_view text, std::vector<uint32_t>* cps, std::vector<size_t>* offsets) {
  cps->clear();
  offsets->clear();
  size_t i = 0;
  while (i < text.size()) {
    const auto b0 = static_cast<uint8_t>(text[i]);
    uint32_t c = 0xFFFFFFFFu;
    size_t len = 1;
    auto cont = [&](size_t k) {
      return i + k < text.size() && (static_cast<uint8_t>(text[i + k]) & 0xC0) == 0x80;
    };
    auto cb = [&](size_t k) {
      return static_cast<uint32_t>(static_cast<uint8_t>(text[i + k]) & 0x3F);
    };
    if (b0 < 0x80) {
      c = b0;
    } else if (b0 >= 0xC2 && b0 < 0xE0 && cont(1)) {
      c = (uint32_t{b0} & 0x1F) << 6 | cb(1);
      len = 2;
    } else if (b0 >= 0xE0 && b0 < 0xF0 && cont(1) && cont(2)) {
      const uint32_t v = (uint32_t{b0} & 0x0F) << 12 | cb(1) << 6 | cb(2);
      if (v >= 0x800 && (v < 0xD800 || v > 0xDFFF)) {
        c = v;
        len = 3;
      }
    } else if (b0 >= 0xF0 && b0 < 0xF5 && cont(1) && cont(2) && cont(3)) {
      const uint32_t v = (uint32_t{b0} & 0x07) << 18 | cb(1) << 12 | cb(2) << 6 | cb(3);
      if (v >= 0x10000 && v <= 0x10FFFF) {
        c = v;
        len = 4;
      }
    }
    cps->push_back(c);
    offsets->push_back(i);
    i += len;
  }
  offsets->push_back(text.size());
}

char AsciiLower(uint32_t c) { return c < 0x80 ? static_cast<char>(c | 0x20) : '\0'; }

// End (exclusive, code point index) of the contraction at i, or i.
size_t Contraction(const std::vector<uint32_t>& cp, size_t i, bool fold) {
  const size_t n = cp.size();
  if (cp[i] != '\'' || i + 1 >= n) return i;
  auto ch = [&](size_t k) -> char {
    if (cp[k] >= 0x80) return '\0';
    return fold ? AsciiLower(cp[k]) : static_cast<char>(cp[k]);
  };
  const char a = ch(i + 1);
  if (a == 's' || a == 't' || a == 'm' || a == 'd') return i + 2;
  if (i + 2 < n) {
    const char b = ch(i + 2);
    if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return i + 3;
  }
  return i;
}

// End of the whitespace alternatives at i (cp[i] is whitespace).
size_t SpaceRun(const std::vector<uint32_t>& cp, size_t i, bool llama3) {
  const size_t n = cp.size();
  size_t j = i;
  while (j < n && IsSpace(cp[j])) ++j;
  if (llama3) {
    // \s*[\r\n]+ : ends after the last CR/LF of the run.
    for (size_t k = j; k > i; --k) {
      if (IsCrLf(cp[k - 1])) return k;
    }
  }
  // \s+(?!\S) : the whole run at the end of text, else all but its last.
  if (j == n) return j;
  if (j - 1 > i) return j - 1;
  return j;  // \s+
}

size_t MatchLlama3(const std::vector<uint32_t>& cp, size_t i) {
  const size_t n = cp.size();
  const uint32_t c = cp[i];
  if (size_t e = Contraction(cp, i, /*fold=*/true); e != i) return e;
  // [^\r\n\p{L}\p{N}]?\p{L}+
  size_t s = i;
  if (!IsCrLf(c) && !IsLetter(c) && !IsNumber(c) && i + 1 < n && IsLetter(cp[i + 1])) s = i + 1;
  if (IsLetter(cp[s])) {
    while (s < n && IsLetter(cp[s])) ++s;
    return s;
  }
  // \p{N}{1,3}
  if (IsNumber(c)) {
    size_t j = i;
    while (j < n && j - i < 3 && IsNumber(cp[j])) ++j;
    return j;
  }
  //  ?[^\s\p{L}\p{N}]+[\r\n]*
  s = (c == ' ' && i + 1 < n && IsOther(cp[i + 1])) ? i + 1 : i;
  if (IsOther(cp[s])) {
    while (s < n && IsOther(cp[s])) ++s;
    while (s < n && IsCrLf(cp[s])) ++s;
    return s;
  }
  return SpaceRun(cp, i, /*llama3=*/true);
}

size_t MatchGpt2(const std::vector<uint32_t>& cp, size_t i) {
  const size_t n = cp.size();
  if (size_t e = Contraction(cp, i, /*fold=*/false); e != i) return e;
  const size_t s = (cp[i] == ' ' && i + 1 < n) ? i + 1 : i;
  for (bool (*cls)(uint32_t) : {&IsLetter, &IsNumber, &IsOther}) {
    //  ?\p{L}+ |  ?\p{N}+ |  ?[^\s\p{L}\p{N}]+
    size_t j = cls(cp[s]) ? s : (cls(cp[i]) ? i : n + 1);
    if (j == n + 1) continue;
    while (j < n && cls(cp[j])) ++j;
    return j;
  }
  return SpaceRun(cp, i, /*llama3=*/false);
}

// GPT-2's bytes_to_unicode(): printable Latin-1 bytes map to themselves, the
// other 68 to U+0100.. in byte order.
struct ByteMap {
  uint32_t to_cp[256];
  int16_t to_byte[512];
  ByteMap() {
    std::fill(std::begin(to_byte), std::end(to_byte), int16_t{-1});
    uint32_t extra = 256;
    for (uint32_t b = 0; b < 256; ++b) {
      const bool keep = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
      to_cp[b] = keep ? b : extra++;
      to_byte[to_cp[b]] = static_cast<int16_t>(b);
    }
  }
};
const ByteMap& Bytes() {
  static const ByteMap m;
  return m;
}

void AppendUtf8(uint32_t c, std::string* out) {
  if (c < 0x80) {
    out->push_back(static_cast<char>(c));
  } else if (c < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (c >> 6)));
    out->push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else if (c < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (c >> 12)));
    out->push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (c >> 18)));
    out->push_back(static_cast<char>(0x80 | ((c >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (c & 0x3F)));
  }
}

std::string ByteLevel(std::string_view raw) {
  std::string s;
  s.reserve(raw.size() * 2);
  for (char ch : raw) AppendUtf8(Bytes().to_cp[static_cast<uint8_t>(ch)], &s);
  return s;
}

#ifdef KVR_HAVE_NLOHMANN_JSON

// bos_token / eos_token of tokenizer_config.json: a string or {"content": s}.
std::string ConfigToken(const Json& cfg, const char* key) {
  auto it = cfg.find(key);
  if (it == cfg.end()) return {};
  if (it->is_string()) return it->get<std::string>();
  if (it->is_object()) {
    auto c = it->find("content");
    if (c != it->end() && c->is_string()) return c->get<std::string>();
  }
  return {};
}
#endif  // KVR_HAVE_NLOHMANN_JSON

}  // namespace

std::vector<std::string_view> PreTokenize(PreTokenizer kind, std::string_view text) {
  std::vector<uint32_t> cp;
  std::vector<size_t> off;
  DecodeUtf8(text, &cp, &off);
  std::vector<std::string_view> out;
  for (size_t i = 0; i < cp.size();) {
    const size_t j = kind == PreTokenizer::kLlama3 ? MatchLlama3(cp, i) : MatchGpt2(cp, i);
    out.push_back(text.substr(off[i], off[j] - off[i]));
    i = j;
  }
  return out;
}

#ifndef KVR_HAVE_NLOHMANN_JSON
// Built without nlohmann-json: tokenizer.json cannot be parsed.
absl::StatusOr<std::unique_ptr<HfBpeTokenizer>> HfBpeTokenizer::Load(const std::string& path,
                                                                     HfBpeOptions) {
  return Parse({}, path);
}

absl::StatusOr<std::unique_ptr<HfBpeTokenizer>> HfBpeTokenizer::Parse(std::string_view,
                                                                      const std::string& name,
                                                                      const HfBpeOptions&) {
  return absl::FailedPreconditionError(absl::StrCat(
      "tokenizer.json ", name,
      ": kvr was built without nlohmann-json (install nlohmann-json3-dev and reconfigure)"));
}
#else
absl::StatusOr<std::unique_ptr<HfBpeTokenizer>> HfBpeTokenizer::Load(const std::string& path,
                                                                     HfBpeOptions options) {
  KVR_ASSIGN_OR_RETURN(const std::string text, ReadText(path));
  const std::filesystem::path cfg_path =
      std::filesystem::path(path).parent_path() / "tokenizer_config.json";
  if (std::filesystem::exists(cfg_path)) {
    KVR_ASSIGN_OR_RETURN(const std::string cfg_text, ReadText(cfg_path.string()));
    const Json cfg = Json::parse(cfg_text, nullptr, /*allow_exceptions=*/false);
    if (cfg.is_object()) {
      if (options.bos_token.empty()) options.bos_token = ConfigToken(cfg, "bos_token");
      if (options.eos_token.empty()) options.eos_token = ConfigToken(cfg, "eos_token");
    }
  }
  return Parse(text, path, options);
}

absl::StatusOr<std::unique_ptr<HfBpeTokenizer>> HfBpeTokenizer::Parse(std::string_view json,
                                                                      const std::string& name,
                                                                      const HfBpeOptions& options) {
  Json j;
  try {
    j = Json::parse(json);
  } catch (const Json::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("tokenizer.json ", name, " is not valid JSON: ", e.what()));
  }
  auto invalid = [&](const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat("tokenizer.json ", name, ": ", why));
  };
  auto unsupported = [&](const std::string& why) {
    return absl::UnimplementedError(absl::StrCat("tokenizer.json ", name, ": ", why));
  };
  if (!j.is_object()) return invalid("top level is not an object");
  std::unique_ptr<HfBpeTokenizer> t(new HfBpeTokenizer);

  if (auto n = j.find("normalizer"); n != j.end() && !n->is_null()) {
    return unsupported(absl::StrCat("normalizer ", n->dump().substr(0, 200), " is not supported"));
  }
  // Pre-tokenizer.
  const Json pre = j.value("pre_tokenizer", Json());
  bool pre_ok = false;
  if (pre.is_object() && pre.value("type", "") == "Sequence") {
    const Json seq = pre.value("pretokenizers", Json::array());
    if (seq.is_array() && seq.size() == 2 && seq[0].is_object() && seq[1].is_object() &&
        seq[0].value("type", "") == "Split" && seq[0].value("behavior", "") == "Isolated" &&
        !seq[0].value("invert", false) && seq[0].contains("pattern") &&
        seq[0]["pattern"].is_object() && seq[0]["pattern"].value("Regex", "") == kLlama3Pattern &&
        seq[1].value("type", "") == "ByteLevel" && !seq[1].value("use_regex", true) &&
        !seq[1].value("add_prefix_space", false)) {
      t->pre_ = PreTokenizer::kLlama3;
      pre_ok = true;
    }
  } else if (pre.is_object() && pre.value("type", "") == "ByteLevel" &&
             pre.value("use_regex", true)) {
    t->pre_ = PreTokenizer::kGpt2;
    t->add_prefix_space_ = pre.value("add_prefix_space", false);
    pre_ok = true;
  }
  if (!pre_ok) {
    return unsupported(absl::StrCat("pre_tokenizer ", pre.dump().substr(0, 300),
                                    " is not supported (Llama-3 Split+ByteLevel or GPT-2 "
                                    "ByteLevel only)"));
  }

  // Model.
  const Json model = j.value("model", Json());
  if (!model.is_object() || model.value("type", "") != "BPE") {
    return unsupported("model.type must be \"BPE\"");
  }
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    if (auto it = model.find(key); it != model.end() && !it->is_null() &&
                                   !(it->is_string() && it->get<std::string>().empty())) {
      return unsupported(absl::StrCat("model.", key, " is not supported"));
    }
  }
  if (model.value("byte_fallback", false))
    return unsupported("model.byte_fallback is not supported");
  if (auto it = model.find("ignore_merges"); it != model.end() && it->is_boolean()) {
    t->ignore_merges_ = it->get<bool>();
  }
  const auto vocab = model.find("vocab");
  if (vocab == model.end() || !vocab->is_object()) return invalid("model.vocab is not an object");
  int64_t max_id = -1;
  auto place = [&](const std::string& tok, int64_t id, bool added) -> absl::Status {
    if (id < 0 || id >= (int64_t{1} << 24)) {
      return invalid(absl::StrCat("token \"", tok, "\" has id ", id, " outside [0, 2^24)"));
    }
    if (static_cast<size_t>(id) >= t->tokens_.size()) {
      t->tokens_.resize(static_cast<size_t>(id) + 1);
      t->is_added_.resize(static_cast<size_t>(id) + 1, 0);
    }
    t->tokens_[static_cast<size_t>(id)] = tok;
    if (added) t->is_added_[static_cast<size_t>(id)] = 1;
    max_id = std::max(max_id, id);
    return absl::OkStatus();
  };
  t->vocab_.reserve(vocab->size());
  for (const auto& [tok, idv] : vocab->items()) {
    if (!idv.is_number_integer())
      return invalid(absl::StrCat("vocab entry \"", tok, "\" has no integer id"));
    KVR_RETURN_IF_ERROR(place(tok, idv.get<int64_t>(), false));
    t->vocab_.emplace(tok, static_cast<int32_t>(idv.get<int64_t>()));
  }
  const auto merges = model.find("merges");
  if (merges == model.end() || !merges->is_array()) return invalid("model.merges is not an array");
  t->merges_.reserve(merges->size());
  int32_t rank = 0;
  for (const Json& m : *merges) {
    std::string a, b;
    if (m.is_string()) {
      const std::string s = m.get<std::string>();
      const size_t sp = s.find(' ');
      if (sp == std::string::npos || sp == 0 || sp + 1 == s.size() ||
          s.find(' ', sp + 1) != std::string::npos) {
        return invalid(
            absl::StrCat("merge ", rank, " \"", s, "\" is not two space-separated tokens"));
      }
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      a = m[0].get<std::string>();
      b = m[1].get<std::string>();
    } else {
      return invalid(absl::StrCat("merge ", rank, " is neither \"a b\" nor [a, b]"));
    }
    const int32_t ia = t->TokenId(a), ib = t->TokenId(b), iab = t->TokenId(a + b);
    if (ia < 0 || ib < 0 || iab < 0) {
      return invalid(absl::StrCat("merge ", rank, " (\"", a, "\", \"", b, "\"): ",
                                  ia < 0   ? a
                                  : ib < 0 ? b
                                           : a + b,
                                  " is not in the vocabulary"));
    }
    // The first (lowest-rank) occurrence of a pair wins, as in HF.
    t->merges_.emplace(uint64_t(uint32_t(ia)) << 32 | uint32_t(ib), Merge{rank, iab});
    ++rank;
  }
  // Added tokens.
  if (auto added = j.find("added_tokens"); added != j.end() && added->is_array()) {
    for (const Json& a : *added) {
      if (!a.is_object() || !a.contains("content") || !a["content"].is_string() ||
          !a.contains("id") || !a["id"].is_number_integer()) {
        return invalid(
            absl::StrCat("added token ", a.dump().substr(0, 200), " needs content and id"));
      }
      const std::string content = a["content"].get<std::string>();
      if (content.empty()) return invalid("an added token has empty content");
      const int64_t id = a["id"].get<int64_t>();
      KVR_RETURN_IF_ERROR(place(content, id, true));
      t->added_.push_back({content, static_cast<int32_t>(id)});
    }
  }
  std::stable_sort(
      t->added_.begin(), t->added_.end(),
      [](const AddedToken& x, const AddedToken& y) { return x.content.size() > y.content.size(); });
  if (max_id < 0) return invalid("the vocabulary is empty");
  for (int b = 0; b < 256; ++b) {
    std::string s;
    AppendUtf8(Bytes().to_cp[b], &s);
    t->byte_token_[b] = t->TokenId(s);
  }

  auto pick = [&](const std::string& wanted, std::initializer_list<const char*> fallbacks,
                  const char* what) -> absl::StatusOr<int32_t> {
    if (!wanted.empty()) {
      for (const AddedToken& a : t->added_) {
        if (a.content == wanted) return a.id;
      }
      if (int32_t id = t->TokenId(wanted); id >= 0) return id;
      return invalid(absl::StrCat(what, " token \"", wanted, "\" is not in the vocabulary"));
    }
    for (const char* f : fallbacks) {
      for (const AddedToken& a : t->added_) {
        if (a.content == f) return a.id;
      }
      if (int32_t id = t->TokenId(f); id >= 0) return id;
    }
    return invalid(absl::StrCat("no ", what, " token found; pass it in HfBpeOptions"));
  };
  KVR_ASSIGN_OR_RETURN(
      t->bos_, pick(options.bos_token, {"<|begin_of_text|>", "<s>", "<|endoftext|>"}, "BOS"));
  KVR_ASSIGN_OR_RETURN(
      t->eos_, pick(options.eos_token, {"<|end_of_text|>", "</s>", "<|endoftext|>"}, "EOS"));
  return t;
}

#endif  // KVR_HAVE_NLOHMANN_JSON

int32_t HfBpeTokenizer::TokenId(std::string_view token) const {
  auto it = vocab_.find(std::string(token));
  return it == vocab_.end() ? -1 : it->second;
}

absl::Status HfBpeTokenizer::EncodePiece(std::string_view piece, std::vector<int32_t>* out) const {
  if (piece.empty()) return absl::OkStatus();
  if (ignore_merges_) {
    if (int32_t id = TokenId(ByteLevel(piece)); id >= 0) {
      out->push_back(id);
      return absl::OkStatus();
    }
  }
  struct Symbol {
    int32_t id;
    int32_t prev, next;
    bool alive;
  };
  const int32_t n = static_cast<int32_t>(piece.size());
  std::vector<Symbol> sym(static_cast<size_t>(n));
  for (int32_t i = 0; i < n; ++i) {
    const uint8_t b = static_cast<uint8_t>(piece[static_cast<size_t>(i)]);
    if (byte_token_[b] < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("tokenizer: byte 0x", absl::Hex(b), " has no token in the vocabulary"));
    }
    sym[static_cast<size_t>(i)] = {byte_token_[b], i - 1, i + 1 < n ? i + 1 : -1, true};
  }
  struct Cand {
    int32_t rank, pos, id;
    bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
  auto push = [&](int32_t pos) {
    const int32_t nx = sym[static_cast<size_t>(pos)].next;
    if (nx < 0) return;
    auto it = merges_.find(uint64_t(uint32_t(sym[static_cast<size_t>(pos)].id)) << 32 |
                           uint32_t(sym[static_cast<size_t>(nx)].id));
    if (it != merges_.end()) heap.push({it->second.rank, pos, it->second.id});
  };
  for (int32_t i = 0; i + 1 < n; ++i) push(i);
  while (!heap.empty()) {
    const Cand c = heap.top();
    heap.pop();
    Symbol& l = sym[static_cast<size_t>(c.pos)];
    if (!l.alive || l.next < 0) continue;
    Symbol& r = sym[static_cast<size_t>(l.next)];
    auto it = merges_.find(uint64_t(uint32_t(l.id)) << 32 | uint32_t(r.id));
    if (it == merges_.end() || it->second.id != c.id || it->second.rank != c.rank)
      continue;  // stale
    l.id = c.id;
    r.alive = false;
    l.next = r.next;
    if (r.next >= 0) sym[static_cast<size_t>(r.next)].prev = c.pos;
    if (l.prev >= 0) push(l.prev);
    push(c.pos);
  }
  for (int32_t i = 0; i >= 0; i = sym[static_cast<size_t>(i)].next)
    out->push_back(sym[static_cast<size_t>(i)].id);
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int32_t>> HfBpeTokenizer::Encode(std::string_view text, bool add_bos,
                                                            bool add_eos) const {
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 2);
  if (add_bos) out.push_back(bos_);
  std::string prefixed;
  auto encode_segment = [&](std::string_view seg, bool first) -> absl::Status {
    if (seg.empty()) return absl::OkStatus();
    if (add_prefix_space_ && first && seg[0] != ' ') {
      prefixed.resize(seg.size() + 1);
      prefixed[0] = ' ';
      std::copy(seg.begin(), seg.end(), prefixed.begin() + 1);
      seg = prefixed;
    }
    for (std::string_view piece : PreTokenize(pre_, seg)) {
      KVR_RETURN_IF_ERROR(EncodePiece(piece, &out));
    }
    return absl::OkStatus();
  };
  // Split on added tokens: leftmost match, longest at that position.
  size_t start = 0, i = 0;
  bool first = true;
  while (i < text.size()) {
    const AddedToken* hit = nullptr;
    if (!added_.empty()) {
      for (const AddedToken& a : added_) {
        if (text.compare(i, a.content.size(), a.content) == 0) {
          hit = &a;
          break;
        }
      }
    }
    if (hit == nullptr) {
      ++i;
      continue;
    }
    KVR_RETURN_IF_ERROR(encode_segment(text.substr(start, i - start), first));
    first = false;
    out.push_back(hit->id);
    i += hit->content.size();
    start = i;
  }
  KVR_RETURN_IF_ERROR(encode_segment(text.substr(start), first));
  if (add_eos) out.push_back(eos_);
  return out;
}

absl::StatusOr<std::string> HfBpeTokenizer::Decode(int32_t prev_id, int32_t id) const {
  if (id < 0 || id >= vocab_size() || tokens_[static_cast<size_t>(id)].empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("token id ", id, " outside vocabulary [0, ", vocab_size(), ") or unassigned"));
  }
  const std::string& tok = tokens_[static_cast<size_t>(id)];
  if (is_added_[static_cast<size_t>(id)]) return tok;
  std::vector<uint32_t> cp;
  std::vector<size_t> off;
  DecodeUtf8(tok, &cp, &off);
  std::string out;
  out.reserve(cp.size());
  for (size_t k = 0; k < cp.size(); ++k) {
    const int16_t b = cp[k] < 512 ? Bytes().to_byte[cp[k]] : int16_t{-1};
    if (b >= 0) {
      out.push_back(static_cast<char>(b));
    } else {
      out.append(tok, off[k], off[k + 1] - off[k]);  // not a byte-level char: as is
    }
  }
  return out;
}

}  // namespace kvr::worker
