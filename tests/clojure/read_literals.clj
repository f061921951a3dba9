;; Reads string literals written by the agent's Clojure string writer with the
;; real Clojure reader, in one JVM:
;;
;;   clojure tests/clojure/read_literals.clj CASES_FILE
;;
;; Each line of CASES_FILE is `case <hex of the UTF-8 input> <literal>` or
;; `control <hex> <text>` (a deliberately unescaped text, to show that the
;; check below can fail). Every form in the literal is read with *read-eval*
;; ON (the worst case); the inputs carry `#=(user/canary!)`, which counts an
;; evaluation if the reader ever runs it. A case passes when its literal reads
;; as exactly one form: a string equal to the input.
;; Prints `cases N mismatches M evaluations E` (and the same for controls).
(ns user)

(def evaluated (atom 0))
(defn canary! [] (swap! evaluated inc) :evaluated)

(defn- unhex ^String [^String hex]
  (let [n (quot (count hex) 2)
        bytes (byte-array n)]
    (dotimes [i n]
      (aset-byte bytes i (unchecked-byte (Integer/parseInt (subs hex (* 2 i) (+ 2 (* 2 i))) 16))))
    (String. bytes "UTF-8")))

(defn- read-all [^String text]
  (let [r (java.io.PushbackReader. (java.io.StringReader. text))
        eof (Object.)]
    (binding [*read-eval* true]
      (try
        (loop [forms []]
          (let [f (read r false eof)]
            (if (identical? f eof) forms (recur (conj forms f)))))
        (catch Exception e [::reader-error (.getMessage e)])))))

(defn- check [lines]
  (let [before @evaluated
        bad (doall (for [[i [hex text]] (map-indexed vector lines)
                         :let [expected (unhex hex)
                               forms (read-all text)]
                         :when (not (and (= 1 (count forms)) (string? (first forms)) (= expected (first forms))))]
                     [i expected forms]))]
    {:cases (count lines) :mismatches bad :evaluations (- @evaluated before)}))

(let [[path] *command-line-args*
      rows (for [line (line-seq (clojure.java.io/reader path :encoding "UTF-8"))
                 :let [[kind hex text] (clojure.string/split line #" " 3)]]
             [kind [hex (or text "")]])
      by-kind (group-by first rows)
      report (fn [label {:keys [cases mismatches evaluations]}]
               (println label "cases" cases "mismatches" (count mismatches) "evaluations" evaluations)
               (doseq [[i expected forms] (take 10 mismatches)]
                 (println "  MISMATCH line" i "expected" (pr-str expected) "read" (pr-str forms))))]
  (report "literals" (check (map second (get by-kind "case"))))
  (report "controls" (check (map second (get by-kind "control"))))
  (flush))
